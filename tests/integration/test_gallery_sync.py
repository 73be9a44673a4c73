"""GallerySync end to end: the real server publisher (GalleryPublisher over a SQLite Store) -> real Mosquitto ->
an edge's GallerySync -> IndexHolder / saved gallery / GalleryAck back at the broker. Forgeries and tampering are
injected at the broker; a restart with the broker down serves the saved gallery. Prints the publish-to-swap time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edge_agent.gallery.index import SAVED_FILE, GalleryIndex, GalleryStore, IndexHolder, IndexParams
from edge_agent.gallery.sync import GallerySync
from enrollment_server.bench_gallery import FINGERPRINT as BENCH_FP
from enrollment_server.bench_gallery import load_synthetic
from enrollment_server.gallery_publisher import GalleryPublisher
from enrollment_server.store import DeviceStatus, Store
from models.contract import topics
from models.contract.gallery import Gallery, GalleryPerson, build_publication, signed_bytes
from models.contract.mqtt_link import InboundMessage, MqttLink
from models.contract.signing import Signer
from models.contract.status import GalleryAck

SITE = "hq"
DEVICE = "door-1"
FP = "dlib_resnet_v1-synctest00000000"
SMALL_CHUNK = 512  # several chunks even for a handful of templates
PEOPLE = {"ann-0001": 2, "ben-0002": 2, "cid-0003": 1}


def embedding(person_id: str, i: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{person_id}/{i}".encode()).digest()[:4], "little")
    return (np.random.default_rng(seed).standard_normal(128) * 0.1).astype(np.float32)


def enroll(store: Store, people: dict[str, int], fp: str = FP) -> None:
    store.ensure_site(SITE)
    for person_id, n in people.items():
        store.add_person(person_id, SITE, person_id.split("-")[0].title())
        for i in range(n):
            digest = hashlib.sha256(f"{person_id}/{i}".encode()).hexdigest()
            store.add_template(person_id, embedding(person_id, i), encoder_fingerprint=fp, image_sha256=digest)


class Acks:
    """The device's ack topic, as the server's ingest would see it."""

    def __init__(self, link: MqttLink) -> None:
        self._got: queue.Queue[GalleryAck] = queue.Queue()
        link.subscribe(topics.gallery_ack(DEVICE), 1, self._on)
        assert link.wait_subscribed(topics.gallery_ack(DEVICE), 5.0)

    def _on(self, msg: InboundMessage) -> None:
        self._got.put(GalleryAck.from_json(msg.payload))

    def next(self, timeout: float = 15.0) -> GalleryAck:
        return self._got.get(timeout=timeout)

    def until_ok(self, version: int, timeout: float = 15.0) -> list[GalleryAck]:
        """Every ack up to the ok of `version`, which is last."""
        seen = []
        deadline = time.monotonic() + timeout
        while not seen or (seen[-1].version, seen[-1].status) != (version, "ok"):
            seen.append(self._got.get(timeout=max(0.01, deadline - time.monotonic())))
        return seen


@dataclasses.dataclass
class Edge:
    sync: GallerySync
    holder: IndexHolder
    applied: queue.Queue[GalleryIndex]
    store_dir: Path

    def index(self) -> GalleryIndex:
        current = self.holder.current
        assert current is not None
        return current


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def server_store(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(tmp_path / "server.db")
    yield store
    store.close()


@pytest.fixture
def edges(mqtt_links, signer) -> Iterator[list[GallerySync]]:
    started: list[GallerySync] = []
    yield started
    for sync in started:
        sync.stop(timeout=30.0)


def start_edge(
    link: MqttLink, signer: Signer, store_dir: Path, edges: list, fp: str = FP, holder=None, params=None
) -> Edge:
    holder = holder if holder is not None else IndexHolder()
    applied: queue.Queue[GalleryIndex] = queue.Queue()
    sync = GallerySync(
        link, SITE, DEVICE, signer.verifier, fp, holder, store_dir, on_applied=applied.put, params=params
    )
    sync.start()
    edges.append(sync)
    return Edge(sync, holder, applied, store_dir)


def publish_raw(link: MqttLink, items: list[tuple[str, bytes]]) -> None:
    """What an attacker with broker access can do: retained messages in the order given."""
    for topic, payload in items:
        assert link.publish(topic, payload, qos=1, retain=True).wait(5.0)


# --- applying, acknowledging, forgetting ------------------------------------------------------------------------


def test_versions_are_applied_acked_and_a_removed_person_leaves_index_and_disk(
    tmp_path, server_store, signer, mosquitto, mqtt_links, edges
):
    enroll(server_store, PEOPLE)
    acks = Acks(mqtt_links(mosquitto))
    edge = start_edge(mqtt_links(mosquitto), signer, tmp_path / "edge", edges)
    assert edge.holder.current is None and edge.sync.status().version is None
    publisher = GalleryPublisher(server_store, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK)

    assert publisher.publish(SITE).version == 1
    ack = acks.next()
    assert (ack.device_id, ack.site, ack.version, ack.status, ack.error) == (DEVICE, SITE, 1, "ok", None)
    index = edge.applied.get(timeout=5.0)
    assert index is edge.holder.current and index.exact
    assert (index.version, index.people, index.templates) == (1, 3, 5)
    assert index.labels == {"ann-0001": "Ann", "ben-0002": "Ben", "cid-0003": "Cid"}
    ben = embedding("ben-0002", 1)
    found = index.search(ben, k=2)
    assert found.person_ids[0, 0] == "ben-0002" and found.distances[0, 0] == 0.0
    status = edge.sync.status()
    assert (status.version, status.people, status.templates, status.last_error) == (1, 3, 5, None)
    assert status.last_applied_at is not None and status.pending_version is None and status.dropped_messages == 0

    server_store.remove_person("ben-0002")
    assert publisher.publish(SITE).version == 2
    assert (acks.next().version, edge.applied.get(timeout=5.0).version) == (2, 2)
    index = edge.index()
    assert index.version == 2 and "ben-0002" not in index.labels and index.templates == 3
    assert edge.index().search(ben, k=2).person_ids[0, 0] != "ben-0002"
    # and from the disk: one file, the v2 publication, neither Ben's id nor any of his vectors in it
    assert sorted(os.listdir(edge.store_dir)) == [SAVED_FILE]
    saved = GalleryStore(edge.store_dir, signer.verifier, FP, SITE).load()
    assert saved is not None and saved.version == 2
    assert [p.person_id for p in saved.people] == ["ann-0001", "cid-0003"]
    data = (edge.store_dir / SAVED_FILE).read_bytes()
    assert b"ben-0002" not in data
    assert all(embedding("ben-0002", i).tobytes() not in data for i in range(2))
    assert embedding("ann-0001", 0).tobytes() in data  # the check above would see a vector that was there


# --- refused updates --------------------------------------------------------------------------------------------


def test_forged_tampered_and_foreign_galleries_get_error_acks_and_the_previous_gallery_serves(
    tmp_path, server_store, signer, mosquitto, mqtt_links, edges
):
    enroll(server_store, PEOPLE)
    enroll(server_store, {"zed-0004": 1}, fp="another_encoder-0123456789abcdef")
    acks = Acks(mqtt_links(mosquitto))
    edge = start_edge(mqtt_links(mosquitto), signer, tmp_path / "edge", edges)
    publisher = GalleryPublisher(server_store, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK)
    publisher.publish(SITE)
    assert acks.next().status == "ok" and edge.applied.get(timeout=5.0).version == 1
    rogue = mqtt_links(mosquitto)
    people = (GalleryPerson("mallory", "Mallory"),)
    mallory = embedding("mallory", 0)[None, :]
    # claiming the release after the one in service, as an attacker would to be applied
    fake = Gallery(
        SITE, 2, FP, "euclidean", "float32", mallory, np.zeros(1, np.int32), people, epoch=edge.index().epoch
    )

    # 1. a forged manifest: an attacker's key, claiming ours
    attacker = Signer.generate()
    manifest, chunks = build_publication(fake, attacker)
    draft = dataclasses.replace(manifest, key_id=signer.key_id, signature="")
    forged = dataclasses.replace(draft, signature=attacker.sign_b64(signed_bytes(draft.to_object())))
    publish_raw(rogue, [(topics.gallery_blob(SITE, i), c) for i, c in enumerate(chunks)])
    publish_raw(rogue, [(topics.gallery_manifest(SITE), forged.to_json())])
    ack = acks.next()
    assert (ack.version, ack.status) == (2, "error") and ack.error.startswith("SignatureError")
    assert edge.index().version == 1 and "mallory" not in edge.index().labels

    # 2. a tampered chunk: a genuinely signed manifest, one of its chunks altered on the way
    manifest, chunks = build_publication(fake, signer, chunk_size=SMALL_CHUNK)
    bad = bytearray(chunks[1])
    bad[10] ^= 0x01
    publish_raw(rogue, [(topics.gallery_manifest(SITE), manifest.to_json())])
    publish_raw(rogue, [(topics.gallery_blob(SITE, i), bytes(bad) if i == 1 else c) for i, c in enumerate(chunks)])
    ack = acks.next()
    assert (ack.version, ack.status) == (2, "error") and ack.error.startswith("IntegrityError")
    assert "chunk 1" in ack.error
    assert edge.index().version == 1 and edge.sync.status().pending_version == 2  # v2 never completes

    # 3. a gallery the real server signed, built under another encoder
    assert GalleryPublisher(server_store, rogue, signer, "another_encoder-0123456789abcdef").publish(SITE).version == 2
    ack = acks.next()
    assert (ack.version, ack.status) == (2, "error") and ack.error.startswith("FingerprintMismatchError")
    status = edge.sync.status()
    assert status.version == 1 and status.last_error.startswith("FingerprintMismatchError")
    assert edge.applied.empty() and edge.index().labels.keys() == set(PEOPLE)
    saved = GalleryStore(edge.store_dir, signer.verifier, FP, SITE).load()
    assert saved is not None and saved.version == 1

    # the worker is alive: the next genuine version applies (v2's stale chunk 1 may draw one more error ack)
    enroll(server_store, {"dan-0005": 1})
    assert publisher.publish(SITE).version == 3
    assert acks.until_ok(3)[-1].error is None
    assert edge.index().version == 3 and "dan-0005" in edge.index().labels


# --- a restored server database ---------------------------------------------------------------------------------


def test_a_restored_server_database_starts_a_new_epoch_that_the_edge_follows(
    tmp_path, signer, mosquitto, mqtt_links, edges
):
    """The server's database is restored from a backup taken at v1 while the edge holds v3: the restored counter
    hands out v2 again. A new epoch makes the edge take it, its lag shows as ahead until then, and a replay of the
    old epoch's v3 is refused out loud."""
    db = tmp_path / "server.db"
    store = Store.open(db)
    enroll(store, PEOPLE)
    acks = Acks(mqtt_links(mosquitto))
    edge = start_edge(mqtt_links(mosquitto), signer, tmp_path / "edge", edges)
    before = GalleryPublisher(store, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK)
    assert before.publish(SITE).version == 1 and acks.next().status == "ok"
    backup = tmp_path / "backup.db"
    with sqlite3.connect(db) as source, sqlite3.connect(backup) as copy:
        source.backup(copy)  # what docs/deployment.md has operators do while the server runs
    enroll(store, {"dan-0004": 1})
    assert before.publish(SITE).version == 2
    store.remove_person("ben-0002")
    old_v3 = before.publish(SITE)
    assert old_v3.version == 3 and acks.until_ok(3)[-1].epoch == old_v3.epoch
    old_manifest = store.latest_gallery_version(SITE).manifest_json.encode()
    store.close()

    # the restore: the database as it was at v1 (Ben back, no Dan), its version counter at 1
    for leftover in (db, db.with_name("server.db-wal"), db.with_name("server.db-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copy(backup, db)
    restored = Store.open(db)
    try:
        assert restored.latest_gallery_version(SITE).version == 1
        # the edge still reports v3 of the old epoch (its retained status): ahead of this database, not "lag 0"
        restored.upsert_device_status(
            DeviceStatus(
                DEVICE, SITE, "online", datetime.now(timezone.utc), gallery_version=3, gallery_epoch=old_v3.epoch
            )
        )
        (door,) = restored.list_devices(SITE)
        assert (door.lag, door.sync) == (-2, "ahead")

        # the restarted server: a new publisher, hence a new epoch, and the restored counter's v2
        after = GalleryPublisher(restored, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK)
        started = after.republish_latest(SITE)
        assert started.version == 2 and started.epoch > old_v3.epoch and not started.republished
        ack = acks.until_ok(2)[-1]
        assert ack.epoch == started.epoch
        index = edge.index()
        assert index.release == (started.epoch, 2) and set(index.labels) == set(PEOPLE)  # the restored people
        restored.record_ack(DEVICE, SITE, ack.version, ok=True, epoch=ack.epoch)  # as the ingest would
        (door,) = restored.list_devices(SITE)
        assert (door.gallery_version, door.gallery_epoch, door.lag, door.sync) == (2, started.epoch, 0, "current")

        # the admin removes Ben again: v3 of the new epoch, applied although the edge held a v3 before
        restored.remove_person("ben-0002")
        assert after.publish(SITE).release == (started.epoch, 3)
        assert acks.until_ok(3)[-1].epoch == started.epoch
        assert "ben-0002" not in edge.index().labels

        # the old epoch's v3, replayed from a broker snapshot: refused and acknowledged as an error
        publish_raw(mqtt_links(mosquitto), [(topics.gallery_manifest(SITE), old_manifest)])
        refused = acks.next()
        assert (refused.version, refused.epoch, refused.status) == (3, old_v3.epoch, "error")
        assert refused.error.startswith("StaleGalleryError") and "older than" in refused.error
        assert edge.index().release == (started.epoch, 3)
    finally:
        restored.close()


def test_a_server_restart_with_nothing_changed_costs_the_edge_no_download(
    tmp_path, server_store, signer, mosquitto, mqtt_links, edges
):
    enroll(server_store, PEOPLE)
    acks = Acks(mqtt_links(mosquitto))
    link = mqtt_links(mosquitto)
    subscribed: list[str] = []
    subscribe = link.subscribe
    link.subscribe = lambda f, qos, handler: (subscribed.append(f), subscribe(f, qos, handler))[1]  # type: ignore[method-assign]
    edge = start_edge(link, signer, tmp_path / "edge", edges)
    first = GalleryPublisher(server_store, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK).publish(SITE)
    assert acks.next().status == "ok" and topics.site_gallery_chunks(SITE) in subscribed  # v1 was downloaded
    subscribed.clear()

    restarted = GalleryPublisher(server_store, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK)
    again = restarted.republish_latest(SITE)  # a new process: a new epoch, the same people
    assert (again.version, again.sha256) == (2, first.sha256) and again.epoch > first.epoch
    assert acks.until_ok(2)[-1].epoch == again.epoch
    assert edge.index().release == (again.epoch, 2)
    assert subscribed == []  # taken over from the gallery in service: not one chunk asked for


# --- restart without a broker -----------------------------------------------------------------------------------


def test_a_restart_with_the_broker_down_serves_the_saved_gallery(
    tmp_path, server_store, signer, mosquitto, mqtt_links, edges
):
    enroll(server_store, PEOPLE)
    edge = start_edge(mqtt_links(mosquitto), signer, tmp_path / "edge", edges)
    publisher = GalleryPublisher(server_store, mqtt_links(mosquitto), signer, FP, chunk_size=SMALL_CHUNK)
    publisher.publish(SITE)
    assert edge.applied.get(timeout=5.0).version == 1
    server_store.remove_person("cid-0003")
    publisher.publish(SITE)
    assert edge.applied.get(timeout=5.0).version == 2
    edge.sync.stop()
    mosquitto.stop()

    link = mqtt_links(mosquitto, wait=False)
    restarted = start_edge(link, signer, tmp_path / "edge", edges)
    assert not link.is_connected()
    index = restarted.index()  # in service as soon as start() returns
    assert (index.version, index.people) == (2, 2) and "cid-0003" not in index.labels
    assert index.search(embedding("ann-0001", 0), k=2).person_ids[0, 0] == "ann-0001"
    assert restarted.sync.status().version == 2

    mosquitto.start()  # the retained v2 comes again: same version, not applied twice
    assert link.wait_connected(10.0)
    time.sleep(1.0)
    assert restarted.applied.empty() and restarted.index() is index


# --- measurement ------------------------------------------------------------------------------------------------


class StampingHolder(IndexHolder):
    def swap(self, new: GalleryIndex) -> GalleryIndex | None:
        old = super().swap(new)
        self.swapped_at = time.perf_counter()
        return old


@pytest.mark.slow
@pytest.mark.parametrize("people", [1000, 10000])
def test_publish_to_swap_time(tmp_path, signer, mosquitto, mqtt_links, edges, capsys, people):
    db = tmp_path / "server.db"
    store = Store.open(db)
    try:
        load_synthetic(store, str(db), SITE, people, 5, seed=7)
        holder = StampingHolder()
        edge = start_edge(mqtt_links(mosquitto), signer, tmp_path / "edge", edges, fp=BENCH_FP, holder=holder)
        publisher = GalleryPublisher(store, mqtt_links(mosquitto), signer, BENCH_FP, ack_timeout_s=120.0)
        started = time.perf_counter()
        published = publisher.publish(SITE)
        index = edge.applied.get(timeout=300.0)
    finally:
        store.close()
    swap_s = holder.swapped_at - started
    assert (index.version, index.templates, index.exact) == (1, people * 5, True)  # serving at once, exact
    assert edge.sync.wait_search_ready(300.0)
    graph_s = time.perf_counter() - started
    assert holder.current.exact == (people * 5 <= 15_000)

    edge.sync.stop()
    restart_started = time.perf_counter()
    restarted = start_edge(mqtt_links(mosquitto), signer, tmp_path / "edge", edges, fp=BENCH_FP)
    restart_s = time.perf_counter() - restart_started
    assert restarted.index().version == 1
    assert restarted.sync.wait_search_ready(300.0)
    loaded = restarted.sync.status()
    with capsys.disabled():
        print(
            f"\n[gallery sync] {people} people x 5 = {people * 5} templates, {published.blob_size / 1e6:.1f} MB in "
            f"{published.chunk_count} chunks: publish start -> edge in service (exact) {swap_s:.2f} s "
            f"(server build {published.build_seconds:.2f} s + publish {published.publish_seconds:.2f} s); "
            f"-> search stage {loaded.search} {graph_s:.2f} s; start-up from the saved gallery (read, verify, "
            f"in service) {restart_s:.2f} s, its search stage ready {time.perf_counter() - restart_started:.2f} s"
        )


@pytest.mark.slow
def test_a_gallery_over_64_mib_applies_at_the_edge(tmp_path, signer, mosquitto, mqtt_links, edges, capsys):
    """135,000 templates of dim 128 in float32: a 70 MB blob, beyond the edge's 64 MiB chunk pool and queue. Before
    the manifest-driven fetch, the chunks outran the manifest, the pool dropped the oldest and nothing asked for
    them again: such a gallery never applied."""
    people, per_person = 27_000, 5
    db = tmp_path / "server.db"
    store = Store.open(db)
    try:
        load_synthetic(store, str(db), SITE, people, per_person, seed=11)
        acks = Acks(mqtt_links(mosquitto))
        edge = start_edge(
            mqtt_links(mosquitto),
            signer,
            tmp_path / "edge",
            edges,
            fp=BENCH_FP,
            params=IndexParams(exact_max_templates=10**9),  # this test is about the transfer, not the graph
        )
        publisher = GalleryPublisher(store, mqtt_links(mosquitto), signer, BENCH_FP, ack_timeout_s=300.0)
        started = time.perf_counter()
        published = publisher.publish(SITE)
        assert published.blob_size > 64 * 2**20
        index = edge.applied.get(timeout=300.0)
        applied_s = time.perf_counter() - started
    finally:
        store.close()
    assert (index.version, index.templates, index.people) == (1, people * per_person, people)
    ack = acks.next(timeout=30.0)
    assert (ack.version, ack.status) == (1, "ok")
    status = edge.sync.status()
    with capsys.disabled():
        print(
            f"\n[gallery sync] {index.templates} templates, {published.blob_size / 2**20:.1f} MiB in "
            f"{published.chunk_count} chunks: publish start -> in service {applied_s:.1f} s; messages dropped by "
            f"the edge's queue {status.dropped_messages}, missing chunks asked for again {status.chunk_requests} times"
        )
