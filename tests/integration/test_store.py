"""enrollment_server.store against real databases: every test runs on SQLite (a temp file) and on PostgreSQL.

The `db` and `store` fixtures live in tests/integration/conftest.py (see tests/integration/storedb.py for how the
PostgreSQL cases get their own database and schema, and when they are skipped).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from sqlalchemy import func, inspect, select
from storedb import Db

from enrollment_server import schema
from enrollment_server.store import (
    AttendanceEvent,
    DeviceStatus,
    Store,
    TemplateQuality,
)
from models.errors import ConflictError, DatabaseVersionError, NotFoundError, StoreError, StoreValueError

FP = "dlib-resnet-v1:test"
UTC = timezone.utc


def _emb(seed: int, dim: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def _sha(tag: object) -> str:
    import hashlib

    return hashlib.sha256(str(tag).encode()).hexdigest()


def _event(
    *,
    site: str = "hq",
    person: str | None = "alice",
    ts: datetime | None = None,
    event_id: str | None = None,
    seq: int = 1,
    device: str = "door-1",
    name: str | None = None,
) -> AttendanceEvent:
    return AttendanceEvent(
        event_id=event_id or str(uuid.uuid4()),
        seq=seq,
        device_id=device,
        site_id=site,
        ts=ts or datetime(2026, 1, 15, 9, 0, tzinfo=UTC),
        camera="cam0",
        track_id=7,
        person_id=person,
        name=name if name is not None else person,
        distance=0.31,
        margin=0.12,
        threshold=0.5,
        gallery_version=3,
        fingerprint=FP,
        snapshot=f"snap/{seq}.jpg",
    )


def _run_threads(n: int, work: Callable[[int], object]) -> list[object]:
    """Run work(i) on n threads released together by a barrier, so the calls really overlap."""
    barrier = threading.Barrier(n)

    def start(i: int) -> object:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(start, range(n)))


# --- schema and migrations --------------------------------------------------------------------------------------


def test_fresh_open_creates_the_schema(store: Store, db: Db) -> None:
    assert store.schema_version() == schema.LATEST_VERSION
    assert store.dialect == db.backend
    engine = db.engine()
    try:
        tables = set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            history = conn.execute(select(schema.schema_version.c.version)).scalars().all()
    finally:
        engine.dispose()
    assert {t.name for t in schema.metadata.sorted_tables} <= tables
    assert history == [m.version for m in schema.MIGRATIONS]


def test_reopen_is_a_noop_and_keeps_data(store: Store, db: Db) -> None:
    store.ensure_site("hq", "Head office")
    store.add_person("alice", "hq", "Alice")
    store.close()
    with Store.open(db.url) as again:
        assert again.schema_version() == schema.LATEST_VERSION
        assert again.get_person("alice").display_name == "Alice"
    engine = db.engine()
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(schema.schema_version)).scalar_one()
    finally:
        engine.dispose()
    assert rows == len(schema.MIGRATIONS)  # no migration re-applied


def test_database_from_a_newer_program_is_refused(store: Store, db: Db) -> None:
    store.ensure_site("hq")
    store.close()
    engine = db.engine()
    try:
        with engine.begin() as conn:
            conn.execute(
                schema.schema_version.insert().values(
                    version=schema.LATEST_VERSION + 1, description="from the future", applied_at=datetime.now(UTC)
                )
            )
        with pytest.raises(DatabaseVersionError, match=r"newer than this program"):
            Store.open(db.url)
        with engine.connect() as conn:  # refused without touching anything
            assert conn.execute(select(func.max(schema.schema_version.c.version))).scalar_one() == (
                schema.LATEST_VERSION + 1
            )
            assert conn.execute(select(func.count()).select_from(schema.sites)).scalar_one() == 1
    finally:
        engine.dispose()


def test_unsupported_or_unopenable_databases_are_refused(tmp_path: Path) -> None:
    """URL handling, before any backend is involved (so not parametrized)."""
    with pytest.raises(StoreValueError, match="unsupported database"):
        Store.open("mysql+pymysql://u@localhost/x")
    with pytest.raises(StoreValueError, match="psycopg 3"):
        Store.open("postgresql+asyncpg://u@localhost/x")
    with pytest.raises(StoreError, match="cannot open"):
        Store.open(tmp_path)  # a directory, not a database file
    with Store.open(f"sqlite:///{tmp_path / 'by-url.db'}") as by_url:
        assert by_url.dialect == "sqlite" and (tmp_path / "by-url.db").is_file()


# --- sites and people -------------------------------------------------------------------------------------------


def test_people_crud_conflicts_and_not_found(store: Store) -> None:
    site = store.ensure_site("hq", "Head office")
    assert site.name == "Head office" and site.created.tzinfo == UTC
    assert store.ensure_site("hq", "another name").name == "Head office"  # ensure does not rename
    store.ensure_site("lab")

    alice = store.add_person("alice", "hq", "Alice")
    assert alice.active and alice.site_id == "hq" and alice.created == alice.updated
    store.add_person("bob", "hq", "Bob", active=False)
    store.add_person("carol", "lab", "Carol")
    assert store.get_person("alice") == alice

    with pytest.raises(ConflictError):
        store.add_person("alice", "lab", "Another Alice")
    with pytest.raises(NotFoundError):
        store.add_person("dave", "nowhere", "Dave")
    for call in (
        lambda: store.get_person("nobody"),
        lambda: store.rename_person("nobody", "X"),
        lambda: store.set_active("nobody", False),
        lambda: store.remove_person("nobody"),
        lambda: store.get_site("nowhere"),
    ):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(StoreValueError):
        store.add_person("", "hq", "Empty")

    assert [p.person_id for p in store.list_people("hq")] == ["alice", "bob"]
    assert [p.person_id for p in store.list_people("hq", active_only=True)] == ["alice"]

    renamed = store.rename_person("alice", "Alice Smith")
    assert renamed.display_name == "Alice Smith"
    assert renamed.created == alice.created and renamed.updated >= alice.updated
    assert store.set_active("bob", True).active
    assert [p.person_id for p in store.list_people("hq", active_only=True)] == ["alice", "bob"]
    assert store.remove_person("bob") == 0
    with pytest.raises(NotFoundError):
        store.get_person("bob")
    assert [s.site_id for s in store.list_sites()] == ["hq", "lab"]


# --- templates --------------------------------------------------------------------------------------------------


def test_template_round_trip_is_exact(store: Store) -> None:
    store.ensure_site("hq")
    store.add_person("alice", "hq", "Alice")
    vector = _emb(1)
    # values a lossy path (text, float64 round trip, byte-order slip) would change
    vector[:4] = [np.float32(-0.0), np.float32(1e-45), np.finfo(np.float32).max, np.float32(1 / 3)]
    quality = TemplateQuality(detector_score=0.998, face_size_px=142.0, blur=211.5, pose_score=0.93)
    added = store.add_template(
        "alice", vector, encoder_fingerprint=FP, image_sha256=_sha("a1").upper(), quality=quality, photo=b"jpeg"
    )
    assert added.image_sha256 == _sha("a1")  # normalised to lower case
    assert not added.has_photo  # keep_photos is off: the photo is dropped
    [listed] = store.list_templates(person_id="alice")
    assert (listed.id, listed.person_id, listed.created) == (added.id, added.person_id, added.created)
    assert listed.embedding.dtype == np.float32 and listed.dim == 128
    assert listed.embedding.tobytes() == vector.astype("<f4").tobytes()
    assert listed.quality == quality and listed.encoder_fingerprint == FP
    assert listed.created.tzinfo == UTC
    assert not listed.embedding.flags.writeable
    assert store.template_photo(added.id) is None

    with pytest.raises(ConflictError):
        store.add_template("alice", _emb(2), encoder_fingerprint=FP, image_sha256=_sha("a1"))
    with pytest.raises(NotFoundError):
        store.add_template("nobody", _emb(2), encoder_fingerprint=FP, image_sha256=_sha("n1"))
    bad = _emb(3)
    bad[5] = np.nan
    for embedding in (bad, np.zeros((2, 64), np.float32), np.zeros(0, np.float32)):
        with pytest.raises(StoreValueError):
            store.add_template("alice", embedding, encoder_fingerprint=FP, image_sha256=_sha("bad"))
    with pytest.raises(StoreValueError):
        store.add_template("alice", _emb(4), encoder_fingerprint=FP, image_sha256="not-a-digest")

    # the same photo may enrol another person (twins, a shared group photo): uniqueness is per person
    store.add_person("bob", "hq", "Bob")
    store.add_template("bob", _emb(5), encoder_fingerprint=FP, image_sha256=_sha("a1"))
    second = store.add_template("alice", _emb(6), encoder_fingerprint="other-encoder", image_sha256=_sha("a2"))
    assert store.count_templates(person_id="alice") == 2
    assert store.count_templates(site_id="hq") == 3
    assert store.count_templates(site_id="hq", fingerprint=FP) == 2
    assert [t.person_id for t in store.list_templates(site_id="hq", fingerprint=FP)] == ["alice", "bob"]
    with pytest.raises(StoreValueError):
        store.list_templates()
    store.delete_template(second.id)
    assert store.count_templates(person_id="alice") == 1
    with pytest.raises(NotFoundError):
        store.delete_template(second.id)


def test_photos_are_kept_only_when_configured(store: Store, db: Db) -> None:
    store.ensure_site("hq")
    store.add_person("alice", "hq", "Alice")
    with Store.open(db.url, keep_photos=True) as keeping:
        kept = keeping.add_template(
            "alice", _emb(1), encoder_fingerprint=FP, image_sha256=_sha("p"), photo=b"\xff\xd8jpeg\x00bytes"
        )
    assert kept.has_photo
    assert store.template_photo(kept.id) == b"\xff\xd8jpeg\x00bytes"


def test_remove_person_cascades_to_templates_and_keeps_events(store: Store, db: Db) -> None:
    store.ensure_site("hq")
    store.add_person("alice", "hq", "Alice")
    store.add_person("bob", "hq", "Bob")
    for i in range(3):
        store.add_template("alice", _emb(i), encoder_fingerprint=FP, image_sha256=_sha(("alice", i)))
    store.add_template("bob", _emb(9), encoder_fingerprint=FP, image_sha256=_sha("bob"))
    assert store.insert_event(_event(person="alice"))

    assert store.remove_person("alice") == 3
    engine = db.engine()
    try:
        with engine.connect() as conn:
            left = conn.execute(select(schema.templates.c.person_id)).scalars().all()
    finally:
        engine.dispose()
    assert left == ["bob"]  # the database's ON DELETE CASCADE did it, not a second DELETE in Python
    assert [e.event.person_id for e in store.events(site_id="hq")] == ["alice"]  # history stays


def test_site_embeddings_active_people_one_fingerprint(store: Store) -> None:
    store.ensure_site("hq")
    store.ensure_site("lab")
    store.add_person("zoe", "hq", "Zoe")
    store.add_person("alice", "hq", "Alice")
    store.add_person("bob", "hq", "Bob")
    store.add_person("carol", "lab", "Carol")
    expected: dict[str, list[np.ndarray]] = {"alice": [], "zoe": []}
    for person, n in (("zoe", 2), ("alice", 3), ("bob", 2), ("carol", 1)):
        for i in range(n):
            vector = _emb(1000 * len(person) + 10 * ord(person[0]) + i)
            store.add_template(person, vector, encoder_fingerprint=FP, image_sha256=_sha((person, i)))
            if person in expected:
                expected[person].append(vector)
    store.add_template("alice", _emb(77), encoder_fingerprint="other-encoder", image_sha256=_sha("other"))
    store.set_active("bob", False)

    embeddings, labels, names = store.site_embeddings("hq", FP)
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 128)
    assert labels == ("alice", "alice", "alice", "zoe", "zoe")  # bob inactive, carol elsewhere, other encoder out
    assert dict(names) == {"alice": "Alice", "zoe": "Zoe"}
    np.testing.assert_array_equal(embeddings, np.stack(expected["alice"] + expected["zoe"]))
    assert not embeddings.flags.writeable

    empty = store.site_embeddings("hq", "no-such-encoder")
    assert len(empty) == 0 and empty.embeddings.shape[0] == 0


def test_site_embeddings_50k_templates(store: Store, db: Db) -> None:
    """The gallery builder's query at the size the design targets; loaded in bulk, read through the API."""
    n_people, per_person, dim = 10_000, 5, 128
    store.ensure_site("big")
    now = datetime.now(UTC)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_people * per_person, dim)).astype(np.float32)
    engine = db.engine()
    try:
        with engine.begin() as conn:
            conn.execute(
                schema.people.insert(),
                [
                    {
                        "person_id": f"p{i:05d}",
                        "site_id": "big",
                        "display_name": f"P {i}",
                        "created": now,
                        "updated": now,
                    }
                    for i in range(n_people)
                ],
            )
            conn.execute(
                schema.templates.insert(),
                [
                    {
                        "person_id": f"p{k // per_person:05d}",
                        "embedding": vectors[k].tobytes(),
                        "dim": dim,
                        "encoder_fingerprint": FP,
                        "image_sha256": _sha(k),
                        "created": now,
                    }
                    for k in range(len(vectors))
                ],
            )
    finally:
        engine.dispose()
    start = time.perf_counter()
    gallery = store.site_embeddings("big", FP)
    elapsed = time.perf_counter() - start
    print(f"\nsite_embeddings {db.backend}: {len(gallery)} templates in {elapsed * 1000:.0f} ms")
    assert gallery.embeddings.shape == (50_000, dim)
    np.testing.assert_array_equal(gallery.embeddings, vectors)  # rows in (person_id, id) order = insertion order
    assert gallery.labels[0] == "p00000" and gallery.labels[-1] == "p09999"
    assert elapsed < 10.0  # generous for a loaded CI machine; about 0.1-0.3 s measured


# --- gallery versions -------------------------------------------------------------------------------------------


def test_concurrent_next_gallery_version_is_distinct_and_consecutive(store: Store) -> None:
    store.ensure_site("hq")
    store.ensure_site("lab")
    per_thread = 5
    results = _run_threads(8, lambda _i: [store.next_gallery_version("hq") for _ in range(per_thread)])
    numbers = sorted(v for chunk in results for v in chunk)  # type: ignore[union-attr]
    assert numbers == list(range(1, 8 * per_thread + 1))
    assert store.next_gallery_version("lab") == 1  # per site
    with pytest.raises(NotFoundError):
        store.next_gallery_version("nowhere")


def test_record_and_list_gallery_versions(store: Store) -> None:
    store.ensure_site("hq")
    assert store.latest_gallery_version("hq") is None
    v1 = store.next_gallery_version("hq")
    v2 = store.next_gallery_version("hq")
    store.record_gallery_version(
        "hq", v1, fingerprint=FP, count=10, people=4, blob_sha256=_sha("b1"), manifest={"version": v1}
    )
    recorded = store.record_gallery_version(
        "hq", v2, fingerprint=FP, count=12, people=5, blob_sha256=_sha("b2"), manifest='{"version": 2}'
    )
    assert recorded.manifest() == {"version": 2} and recorded.created.tzinfo == UTC
    assert store.latest_gallery_version("hq") == recorded
    assert [g.version for g in store.list_gallery_versions("hq")] == [2, 1]
    with pytest.raises(ConflictError):
        store.record_gallery_version("hq", v2, fingerprint=FP, count=1, people=1, blob_sha256=_sha("x"), manifest={})
    with pytest.raises(StoreValueError, match="not allocated"):
        store.record_gallery_version("hq", 3, fingerprint=FP, count=1, people=1, blob_sha256=_sha("x"), manifest={})
    with pytest.raises(StoreValueError, match="JSON"):
        store.record_gallery_version("hq", 1, fingerprint=FP, count=1, people=1, blob_sha256=_sha("x"), manifest="{")
    with pytest.raises(NotFoundError):
        store.record_gallery_version(
            "nowhere", 1, fingerprint=FP, count=1, people=1, blob_sha256=_sha("x"), manifest={}
        )


# --- devices ----------------------------------------------------------------------------------------------------


def test_device_status_acks_and_lag(store: Store) -> None:
    store.ensure_site("hq")
    for _ in range(3):
        version = store.next_gallery_version("hq")
        store.record_gallery_version(
            "hq", version, fingerprint=FP, count=1, people=1, blob_sha256=_sha(version), manifest={}
        )
    t0 = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
    assert store.upsert_device_status(
        DeviceStatus("door-1", "hq", "online", t0, agent_version="0.1.0", gallery_version=1, health={"fps": 14.5})
    )
    assert store.upsert_device_status(DeviceStatus("door-2", "hq", "online", t0, gallery_version=1))
    # an older retained status re-delivered after a newer one changes nothing
    assert not store.upsert_device_status(DeviceStatus("door-1", "hq", "offline", t0 - timedelta(minutes=5)))
    with pytest.raises(StoreValueError):
        store.upsert_device_status(DeviceStatus("door-1", "hq", "sleeping", t0))
    with pytest.raises(StoreValueError):
        store.upsert_device_status(DeviceStatus("door-1", "hq", "online", t0.replace(tzinfo=None)))

    store.record_ack("door-1", "hq", 3, ok=True)
    store.record_ack("door-1", "hq", 2, ok=True)  # a redelivered old ack must not roll the applied version back
    failed = store.record_ack("door-2", "hq", 3, ok=False, error="fingerprint mismatch")
    assert failed.status == "error" and failed.error == "fingerprint mismatch"
    store.record_ack("door-3", "hq", 2, ok=True)  # acked before any status: registered as unknown

    by_id = {d.device_id: d for d in store.list_devices("hq")}
    assert set(by_id) == {"door-1", "door-2", "door-3"}
    assert (by_id["door-1"].gallery_version, by_id["door-1"].lag, by_id["door-1"].state) == (3, 0, "online")
    assert by_id["door-1"].health() == {"fps": 14.5} and by_id["door-1"].agent_version == "0.1.0"
    assert by_id["door-1"].last_status_ts == t0 and by_id["door-1"].last_seen.tzinfo == UTC
    assert (by_id["door-2"].gallery_version, by_id["door-2"].lag) == (1, 2)  # the error ack changed nothing
    assert (by_id["door-3"].state, by_id["door-3"].lag) == ("unknown", 1)
    assert all(d.latest_site_version == 3 for d in by_id.values())

    # a newer status wins, including its gallery version
    assert store.upsert_device_status(
        DeviceStatus("door-2", "hq", "stopped", t0 + timedelta(minutes=1), gallery_version=3)
    )
    [door2] = [d for d in store.list_devices() if d.device_id == "door-2"]
    assert (door2.state, door2.lag) == ("stopped", 0)
    assert [a.version for a in store.list_acks(device_id="door-1")] == [2, 3]  # newest first
    assert len(store.list_acks(site_id="hq")) == 4


def test_gallery_epochs_order_releases_and_lag_says_ahead_or_other_epoch(store: Store) -> None:
    """Versions count within a database; epochs grow when a server cannot prove it continues that count (a
    restored or moved database). Lag compares releases: never clamped at 0, negative when ahead, none across
    epochs this database never recorded."""
    store.ensure_site("hq")

    def record(epoch: int) -> int:
        version = store.next_gallery_version("hq")
        store.record_gallery_version(
            "hq", version, fingerprint=FP, count=1, people=1, blob_sha256=_sha(version), manifest={}, epoch=epoch
        )
        return version

    assert [record(1_000) for _ in range(3)] == [1, 2, 3]
    assert [record(2_000) for _ in range(2)] == [4, 5]
    assert store.latest_gallery_version("hq").release == (2_000, 5)
    assert [g.release for g in store.list_gallery_versions("hq")][:3] == [(2_000, 5), (2_000, 4), (1_000, 3)]
    with pytest.raises(StoreValueError, match="epoch"):
        store.record_gallery_version(
            "hq", 5, fingerprint=FP, count=1, people=1, blob_sha256=_sha(9), manifest={}, epoch=-1
        )

    t0 = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
    cases = {
        "door-current": (5, 2_000),  # the newest release
        "door-behind": (2, 1_000),  # a recorded release of an older epoch: the count runs on
        "door-ahead": (7, 2_000),  # same epoch, a version this database never reached (restored from a backup)
        "door-newer": (1, 3_000),  # a newer epoch this database never recorded (another server, a replaced db)
        "door-other": (57, 500),  # an older epoch this database never recorded: no count applies
        "door-old-edge": (3, None),  # a 1.0 edge: versions only
    }
    for device, (version, epoch) in cases.items():
        store.upsert_device_status(
            DeviceStatus(device, "hq", "online", t0, gallery_version=version, gallery_epoch=epoch)
        )
    store.upsert_device_status(DeviceStatus("door-none", "hq", "online", t0))
    got = {d.device_id: (d.lag, d.sync) for d in store.list_devices("hq")}
    assert got == {
        "door-current": (0, "current"),
        "door-behind": (3, "behind"),
        "door-ahead": (-2, "ahead"),
        "door-newer": (None, "ahead"),
        "door-other": (None, "other_epoch"),
        "door-old-edge": (2, "behind"),
        "door-none": (5, "behind"),
    }
    store.ensure_site("lab")
    store.upsert_device_status(DeviceStatus("door-lab", "lab", "online", t0, gallery_version=1, gallery_epoch=1))
    assert [(d.lag, d.sync) for d in store.list_devices("lab")] == [(None, "unpublished")]

    # acks move the applied release forward by (epoch, version): a new epoch's v2 after an old epoch's v57
    store.record_ack("door-x", "hq", 57, ok=True, epoch=1_000)
    store.record_ack("door-x", "hq", 2, ok=True, epoch=2_000)
    store.record_ack("door-x", "hq", 58, ok=True, epoch=1_000)  # redelivered from the old epoch: no rollback
    (door,) = [d for d in store.list_devices("hq") if d.device_id == "door-x"]
    assert (door.gallery_version, door.gallery_epoch) == (2, 2_000)
    assert [(a.version, a.epoch) for a in store.list_acks(device_id="door-x")] == [(58, 1_000), (2, 2_000), (57, 1_000)]


def test_a_schema_1_database_gets_the_epoch_columns_and_keeps_its_rows(store: Store, db: Db) -> None:
    store.ensure_site("hq")
    version = store.next_gallery_version("hq")
    store.record_gallery_version("hq", version, fingerprint=FP, count=1, people=1, blob_sha256=_sha(1), manifest={})
    store.record_ack("door-1", "hq", version, ok=True)
    store.close()
    engine = db.engine()
    try:  # back to what schema 1 had
        with engine.begin() as conn:
            for table, column in (
                ("gallery_versions", "epoch"),
                ("devices", "gallery_epoch"),
                ("gallery_acks", "epoch"),
            ):
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
            conn.execute(schema.schema_version.delete().where(schema.schema_version.c.version > 1))
    finally:
        engine.dispose()
    with Store.open(db.url) as upgraded:
        assert upgraded.schema_version() == schema.LATEST_VERSION
        assert upgraded.latest_gallery_version("hq").release == (0, 1)
        (door,) = upgraded.list_devices("hq")
        assert (door.gallery_version, door.gallery_epoch, door.lag, door.sync) == (1, None, 0, "current")
        upgraded.record_ack("door-1", "hq", 2, ok=True, epoch=5)
        assert upgraded.list_acks(device_id="door-1")[0].epoch == 5


# --- attendance -------------------------------------------------------------------------------------------------


def test_insert_event_counts_duplicates(store: Store) -> None:
    event = _event()
    assert store.insert_event(event) is True
    assert store.insert_event(event) is False
    # the same UUID in another spelling is the same event
    assert store.insert_event(_event(event_id=event.event_id.upper())) is False
    [stored] = store.events()
    assert stored.event == event
    assert stored.duplicates == 2
    assert stored.received_at.tzinfo == UTC
    with pytest.raises(StoreValueError):
        store.insert_event(_event(event_id="not-a-uuid"))
    with pytest.raises(StoreValueError):
        store.insert_event(_event(ts=datetime(2026, 1, 15, 9, 0)))  # naive
    with pytest.raises(StoreValueError, match="longer than"):
        store.insert_event(_event(device="d" * 129))  # PostgreSQL would enforce it, SQLite not: checked up front
    assert store.count_events() == 1


def test_timestamps_are_normalised_to_utc(store: Store) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    local = datetime(2026, 1, 15, 14, 30, 0, 123456, tzinfo=india)
    store.insert_event(_event(ts=local))
    [stored] = store.events()
    assert stored.event.ts == local
    assert stored.event.ts.tzinfo == UTC and stored.event.ts.hour == 9
    assert stored.event.ts.microsecond == 123456
    with pytest.raises(StoreValueError, match="naive"):
        store.events(start=datetime(2026, 1, 15))
    with pytest.raises(StoreValueError, match="naive"):
        store.record_ack("door-1", "hq", 1, ok=True, received=datetime(2026, 1, 15))


def test_insert_events_batch(store: Store) -> None:
    a, b, c = (_event(seq=i) for i in range(3))
    assert store.insert_events([a, b, a]) == [True, True, False]
    assert store.insert_events([c, b, b]) == [True, False, False]
    assert store.insert_events([]) == []
    dup = {e.event.event_id: e.duplicates for e in store.events()}
    assert dup == {a.event_id: 1, b.event_id: 2, c.event_id: 0}
    with pytest.raises(StoreValueError):  # one bad event rejects the batch before anything is written
        store.insert_events([_event(seq=9), _event(event_id="bad")])
    assert store.count_events() == 3


def test_concurrent_insert_of_the_same_events(store: Store) -> None:
    ids = [str(uuid.uuid4()) for _ in range(200)]

    def deliver(worker: int) -> int:
        order = ids[:]
        random.Random(worker).shuffle(order)  # different orders make the races real
        return sum(store.insert_event(_event(event_id=i, seq=n)) for n, i in enumerate(order))

    new_counts = _run_threads(4, deliver)
    assert sum(new_counts) == 200  # type: ignore[arg-type]
    stored = store.events()
    assert len(stored) == 200
    assert sum(e.duplicates for e in stored) == 600


def test_concurrent_batches_of_the_same_events(store: Store) -> None:
    ids = [str(uuid.uuid4()) for _ in range(200)]

    def deliver(worker: int) -> int:
        order = ids[:]
        random.Random(100 + worker).shuffle(order)
        new = 0
        for k in range(0, len(order), 50):
            new += sum(store.insert_events([_event(event_id=i) for i in order[k : k + 50]]))
        return new

    assert sum(_run_threads(4, deliver)) == 200  # type: ignore[arg-type]
    stored = store.events()
    assert len(stored) == 200
    assert sum(e.duplicates for e in stored) == 600


def test_events_query(store: Store) -> None:
    t = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
    store.insert_events(
        [
            _event(person="alice", ts=t),
            _event(person="bob", ts=t + timedelta(hours=1)),
            _event(person="alice", ts=t + timedelta(hours=2)),
            _event(person="alice", ts=t + timedelta(hours=3), site="lab"),
            _event(person=None, ts=t + timedelta(hours=4)),
        ]
    )
    assert len(store.events(site_id="hq")) == 4
    window = store.events(site_id="hq", start=t + timedelta(hours=1), end=t + timedelta(hours=2))
    assert [e.event.person_id for e in window] == ["bob"]  # end is exclusive
    alice = store.events(person_id="alice")
    assert [e.event.ts for e in alice] == [t, t + timedelta(hours=2), t + timedelta(hours=3)]  # oldest first
    assert len(store.events(limit=2)) == 2


def test_daily_report_two_days_two_sites(store: Store) -> None:
    store.ensure_site("hq")
    store.ensure_site("lab")
    store.add_person("alice", "hq", "Alice Smith")
    store.add_person("bob", "hq", "Bob")
    day1, day2 = date(2026, 1, 15), date(2026, 1, 16)

    def at(day: date, hh: int, mm: int = 0) -> datetime:
        return datetime(day.year, day.month, day.day, hh, mm, tzinfo=UTC)

    repeated = _event(person="alice", ts=at(day1, 12))
    store.insert_events(
        [
            _event(person="alice", ts=at(day1, 8, 5), name="alice (old name)"),
            repeated,
            repeated,  # a redelivery is not a second sighting
            _event(person="alice", ts=at(day1, 17, 30)),
            _event(person="bob", ts=at(day1, 10)),
            _event(person=None, ts=at(day1, 11)),  # strangers are not in the report
            _event(person="alice", ts=at(day1, 13), site="lab"),
            _event(person="alice", ts=at(day2, 9)),
            _event(person="carol", ts=at(day1, 9), name="Carol (deleted since)", site="lab"),
            _event(person="alice", ts=at(day1, 23, 30)),  # 00:30 on day 2 in Berlin
        ]
    )

    rows = store.daily_report("hq", day1)
    assert [(r.person_id, r.events) for r in rows] == [("alice", 4), ("bob", 1)]
    alice = rows[0]
    assert alice.name == "Alice Smith"  # the current name, not the one events carried
    assert (alice.first_seen, alice.last_seen) == (at(day1, 8, 5), at(day1, 23, 30))
    assert alice.first_seen.tzinfo == UTC and alice.day == day1 and alice.site_id == "hq"

    everywhere = store.daily_report(None, day1)
    assert [(r.site_id, r.person_id) for r in everywhere] == [
        ("hq", "alice"),
        ("hq", "bob"),
        ("lab", "alice"),
        ("lab", "carol"),
    ]
    assert everywhere[3].name == "Carol (deleted since)"

    [day2_row] = store.daily_report("hq", day2)
    assert (day2_row.person_id, day2_row.events, day2_row.first_seen) == ("alice", 1, at(day2, 9))

    berlin = ZoneInfo("Europe/Berlin")  # UTC+1 in January
    [b1, _bob] = store.daily_report("hq", day1, tz=berlin)
    assert (b1.events, b1.last_seen) == (3, at(day1, 17, 30))
    [b2] = store.daily_report("hq", day2, tz=berlin)
    assert (b2.events, b2.first_seen, b2.last_seen) == (2, at(day1, 23, 30), at(day2, 9))
    assert store.daily_report("hq", date(2026, 1, 20)) == []


def test_daily_report_across_a_dst_change(store: Store) -> None:
    """The local day of the spring change is 23 hours long: bounds come from the zone, not from day * 24 h."""
    berlin = ZoneInfo("Europe/Berlin")
    change = date(2026, 3, 29)  # 02:00 CET -> 03:00 CEST
    early = datetime(2026, 3, 28, 23, 30, tzinfo=UTC)  # 00:30 local on the 29th (CET)
    late = datetime(2026, 3, 29, 21, 30, tzinfo=UTC)  # 23:30 local on the 29th (CEST)
    after = datetime(2026, 3, 29, 22, 30, tzinfo=UTC)  # 00:30 local on the 30th
    store.insert_events([_event(ts=early), _event(ts=late), _event(ts=after)])
    [row] = store.daily_report("hq", change, tz=berlin)
    assert (row.events, row.first_seen, row.last_seen) == (2, early, late)
