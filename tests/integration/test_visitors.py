"""Unknown visitors on the server: the store's faces (SQLite and PostgreSQL), the schema upgrade that added them,
grouping real faces by identity, naming / ignoring a group through the real enroller, retention, and the visitor
ingest on a real broker (what is stored, what is refused and why).

Faces are the shipped demo photos, detected, encoded and cropped as an edge does (tests/integration/visitor_faces.py).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect, text
from storedb import Db
from visitor_faces import T0, real_faces, record, wire
from waiting import wait_until

from enrollment_server import schema
from enrollment_server.config import EnrollmentSection, UnknownVisitorsSection
from enrollment_server.enrollment import Enroller
from enrollment_server.store import Store
from enrollment_server.visitor_ingest import VisitorIngest
from enrollment_server.visitors import Visitors, cluster
from models.contract import topics
from models.errors import NotFoundError, StoreValueError
from models.face import quality as q
from models.face.pipeline import FacePipeline
from models.imageio import encode_jpeg

SITE = "hq"
PEOPLE = {"Mark_Zuckerberg": 5, "Barack_Obama": 4, "Jack_Dorsey": 4, "Elon_Musk": 3}


@pytest.fixture(scope="module")
def faces(pipeline: FacePipeline):
    return real_faces(pipeline, PEOPLE)


def visitors_over(store: Store, pipeline: FacePipeline, **cfg: object) -> Visitors:
    return Visitors(store, UnknownVisitorsSection(sites=(SITE,), **cfg), Enroller(store, pipeline, EnrollmentSection()))


def fill(store: Store, faces, fingerprint: str, *, site: str = SITE) -> dict[int, str]:
    """Store every face; returns stored id -> the person it shows."""
    store.ensure_site(site)
    for i, f in enumerate(faces):
        assert store.add_unknown_face(record(f, site=site, fingerprint=fingerprint, i=i), f.crop)
    return {s.id: faces[s.face.track_id].person for s in store.list_unknown_faces(site)}


# --- the store --------------------------------------------------------------------------------------------------


def test_store_keeps_faces_once_with_their_crops_and_deletes_them(store: Store, faces) -> None:
    store.ensure_site(SITE)
    f = faces[0]
    face = record(f, site=SITE, fingerprint="fp", i=3)
    assert store.add_unknown_face(face, f.crop, received_at=T0)
    assert not store.add_unknown_face(face, f.crop)  # a QoS 1 redelivery: stored once
    [stored] = store.list_unknown_faces(SITE)
    assert stored.face.face_id == face.face_id and stored.face.ts == face.ts and stored.received_at == T0
    assert np.array_equal(stored.face.embedding, f.embedding) and stored.face.quality == face.quality
    assert store.unknown_face_crops([stored.id, 999]) == {stored.id: f.crop}
    assert store.list_unknown_faces(SITE, fingerprint="other") == [] and store.list_unknown_faces("lab") == []
    assert store.count_unknown_faces(SITE) == 1
    assert store.delete_unknown_faces([stored.id]) == 1 and store.count_unknown_faces() == 0
    other = record(f, site=SITE, fingerprint="fp", i=1)
    for bad in (replace(other, face_id="x"), replace(other, embedding=np.full(128, np.nan, np.float32))):
        with pytest.raises(StoreValueError):
            store.add_unknown_face(bad, f.crop)
    with pytest.raises(StoreValueError):
        store.add_unknown_face(record(f, site=SITE, fingerprint="fp", i=2), b"")


def test_retention_deletes_by_age_by_count_and_sites_no_longer_opted_in(store: Store, faces) -> None:
    for site in (SITE, "lab", "annex"):
        store.ensure_site(site)
        for i in range(6):
            store.add_unknown_face(record(faces[i], site=site, fingerprint="fp", i=i), faces[i].crop)
    # faces are 7 minutes apart from T0: an age limit at T0 + 20 min removes the first three of each site
    removed = store.purge_unknown_faces(sites=[SITE, "lab"], older_than=T0 + timedelta(minutes=20), keep=2)
    assert removed == 6 + 3 + 1 + 3 + 1  # annex entirely; per kept site 3 by age and 1 by count
    for site in (SITE, "lab"):
        kept = store.list_unknown_faces(site)
        assert [s.face.track_id for s in kept] == [4, 5]  # the newest two
    assert store.list_unknown_faces("annex") == []
    assert store.purge_unknown_faces(sites=[SITE, "lab"], older_than=T0, keep=2) == 0
    with pytest.raises(StoreValueError):
        store.purge_unknown_faces(sites=[], older_than=T0, keep=-1)


def test_a_database_from_before_thumbnails_is_upgraded_with_its_templates_kept(db: Db) -> None:
    store = Store.open(db.url)
    store.ensure_site(SITE)
    store.add_person("ann", SITE, "Ann")
    store.add_template("ann", np.ones(128, np.float32), encoder_fingerprint="fp", image_sha256="a" * 64)
    store.close()
    # back to what version 2 wrote: no thumbnail column, no unknown_faces table
    engine = db.engine()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE templates DROP COLUMN thumbnail"))
        conn.execute(text("DROP TABLE unknown_faces"))
        conn.execute(text("DROP TABLE site_decisions"))  # schema 4
        conn.execute(text("DELETE FROM schema_version WHERE version >= 3"))
    engine.dispose()
    store = Store.open(db.url)
    try:
        assert store.schema_version() == schema.LATEST_VERSION == 4
        [t] = store.list_templates(person_id="ann")
        assert not t.has_thumbnail and store.template_thumbnail(t.id) is None
        new = store.add_template(
            "ann", np.zeros(128, np.float32), encoder_fingerprint="fp", image_sha256="b" * 64, thumbnail=b"\xff\xd8x"
        )
        assert new.has_thumbnail and store.template_thumbnail(new.id) == b"\xff\xd8x"
        assert store.count_unknown_faces() == 0
    finally:
        store.close()
    engine = db.engine()
    assert "thumbnail" in {c["name"] for c in inspect(engine).get_columns("templates")}
    engine.dispose()


# --- grouping ---------------------------------------------------------------------------------------------------


def test_real_faces_group_by_person_whatever_their_order(faces, pipeline: FacePipeline) -> None:
    threshold = EnrollmentSection().duplicate_identity_distance
    embeddings = np.stack([f.embedding for f in faces])
    groups = cluster(embeddings, threshold)
    as_people = sorted(sorted(Counter(faces[i].person for i in g).items()) for g in groups)
    assert as_people == sorted([[(p, n)] for p, n in PEOPLE.items()]), as_people
    assert cluster(embeddings, threshold) == groups  # deterministic
    order = list(range(len(faces)))
    random.Random(5).shuffle(order)
    shuffled = cluster(embeddings[order], threshold)
    assert sorted(sorted(order[i] for i in g) for g in shuffled) == sorted(sorted(g) for g in groups)
    assert cluster(np.zeros((0, 128)), threshold) == [] and cluster(embeddings[:1], threshold) == [[0]]


def test_groups_carry_their_best_faces_times_doors_and_the_nearest_enrolled_person(
    sqlite_store: Store, faces, pipeline: FacePipeline
) -> None:
    store = sqlite_store
    visitors = visitors_over(store, pipeline)
    fp = visitors.fingerprint
    store.ensure_site(SITE)
    # Obama is enrolled (from his last photo); his other photos come in as unknown visitors
    obama = [f for f in faces if f.person == "Barack_Obama"]
    report = visitors.enroller.enroll("obama", "Barack Obama", SITE, [("enrolled.jpg", obama[-1].photo.read_bytes())])
    assert report.added == 1
    unknown = [f for f in faces if f.photo != obama[-1].photo]
    for i, f in enumerate(unknown):
        store.add_unknown_face(
            record(f, site=SITE, fingerprint=fp, i=i, device="door-2" if i % 2 else "door-1"), f.crop
        )
    groups = visitors.groups(SITE)
    assert sorted(g.size for g in groups) == sorted(n - (p == "Barack_Obama") for p, n in PEOPLE.items())
    assert [g.last_seen for g in groups] == sorted((g.last_seen for g in groups), reverse=True)
    for g in groups:
        assert [f.quality for f in g.faces] == sorted((f.quality for f in g.faces), reverse=True)
        assert set(g.face_ids) == {f.id for f in g.faces} and g.key == min(g.face_ids)
        assert g.first_seen <= g.last_seen and set(g.doors) <= {"door-1/entrance", "door-2/entrance"}
        assert g.nearest_person == "obama"  # the only enrolled person is everybody's nearest
    by_obama = min(groups, key=lambda g: g.nearest_distance)
    assert by_obama.nearest_distance < EnrollmentSection().duplicate_identity_distance
    assert all(g.nearest_distance > 0.6 for g in groups if g is not by_obama)


# --- actions ----------------------------------------------------------------------------------------------------


def test_this_is_new_person_and_ignore(sqlite_store: Store, faces, pipeline: FacePipeline) -> None:
    store = sqlite_store
    visitors = visitors_over(store, pipeline, best_crops=2)
    person_of = fill(store, faces, visitors.fingerprint)
    groups = {person_of[g.key]: g for g in visitors.groups(SITE)}

    # new person: the two best crops of Mark's group go through the quality gate (the best-rated one is his small
    # fifth photo: 27 px between the eyes, refused as too small); the group's faces are gone
    mark = groups["Mark_Zuckerberg"]
    done = visitors.enroll(SITE, mark.face_ids, "mark", "Mark Zuckerberg", allow_duplicate_identity=False)
    assert done.report is not None and done.report.person_created
    assert Counter(r.reason for r in done.report.results) == {None: 1, q.TOO_SMALL: 1}, done.report.to_json()
    assert done.deleted == mark.size and store.get_person("mark").display_name == "Mark Zuckerberg"
    assert len(store.list_templates(person_id="mark")) == 1
    assert all(t.has_thumbnail for t in store.list_templates(person_id="mark"))

    # "this is": Jack's group added to an existing person
    store.add_person("jack", SITE, "Jack Dorsey")
    jack = groups["Jack_Dorsey"]
    done = visitors.assign(SITE, jack.face_ids, "jack")
    assert done.report.added >= 1 and done.deleted == jack.size

    # a second group of Mark (as if a stranger's faces): "new person" is refused as a probable duplicate
    more_mark = [f for f in faces if f.person == "Mark_Zuckerberg"][:2]
    for i, f in enumerate(more_mark, start=100):
        store.add_unknown_face(record(f, site=SITE, fingerprint=visitors.fingerprint, i=i), f.crop)
    again = next(g for g in visitors.groups(SITE) if g.nearest_person == "mark")
    refused = visitors.enroll(SITE, again.face_ids, "mark-2", "Mark Again", allow_duplicate_identity=False)
    assert refused.report.added == 0 and refused.deleted == 0
    assert {r.reason for r in refused.report.results} == {q.PROBABLE_DUPLICATE_IDENTITY}
    assert {r.matched_person for r in refused.report.results} == {"mark"}
    with pytest.raises(NotFoundError):
        store.get_person("mark-2")
    assert visitors.assign(SITE, again.face_ids, "mark").deleted == again.size  # it was him

    # ignore: the faces are deleted, nothing enrolled
    elon = groups["Elon_Musk"]
    done = visitors.ignore(SITE, elon.face_ids)
    assert done.report is None and done.deleted == elon.size
    assert [person_of.get(g.key) for g in visitors.groups(SITE)] == ["Barack_Obama"]

    # faces that are gone, of another site, or none at all: refused without a change
    with pytest.raises(NotFoundError):
        visitors.ignore(SITE, elon.face_ids)
    with pytest.raises(StoreValueError):
        visitors.ignore(SITE, [])
    with pytest.raises(NotFoundError):
        visitors.assign(SITE, groups["Barack_Obama"].face_ids, "nobody")
    with pytest.raises(StoreValueError):
        visitors.enroll(SITE, groups["Barack_Obama"].face_ids, "jack", "Jack", allow_duplicate_identity=False)


def test_a_group_whose_crops_all_fail_the_gate_is_kept(sqlite_store: Store, faces, pipeline: FacePipeline) -> None:
    store = sqlite_store
    visitors = visitors_over(store, pipeline)
    store.ensure_site(SITE)
    blank = encode_jpeg(np.full((200, 200, 3), 128, np.uint8), 85)  # no face in it
    face = record(faces[0], site=SITE, fingerprint=visitors.fingerprint, i=0)
    store.add_unknown_face(face, blank)
    [g] = visitors.groups(SITE)
    done = visitors.enroll(SITE, g.face_ids, "someone", "Someone", allow_duplicate_identity=False)
    assert done.report.added == 0 and done.deleted == 0
    assert [r.reason for r in done.report.results] == [q.NO_FACE]
    assert store.count_unknown_faces(SITE) == 1


def test_purge_applies_the_configured_limits(sqlite_store: Store, faces, pipeline: FacePipeline) -> None:
    store = sqlite_store
    visitors = visitors_over(store, pipeline, max_age_days=1, max_faces=3)
    fill(store, faces[:5], visitors.fingerprint)
    fill(store, faces[:2], visitors.fingerprint, site="lab")  # a site that is not (any longer) opted in
    assert visitors.purge(now=T0 + timedelta(hours=1)) == 2 + 2
    assert [s.face.track_id for s in store.list_unknown_faces(SITE)] == [2, 3, 4]
    assert visitors.purge(now=T0 + timedelta(days=2)) == 3 and store.count_unknown_faces() == 0


# --- the ingest on a real broker ----------------------------------------------------------------------------------


def test_the_visitor_ingest_stores_opted_in_faces_and_refuses_the_rest(
    sqlite_store: Store, faces, pipeline: FacePipeline, mosquitto, mqtt_links
) -> None:
    store = sqlite_store
    visitors = visitors_over(store, pipeline)
    fp = visitors.fingerprint
    store.ensure_site(SITE)
    ingest = VisitorIngest(store, mqtt_links(mosquitto, client_id=f"visitors-{uuid.uuid4().hex[:6]}"), visitors)
    ingest.start()
    try:
        assert ingest.wait_subscribed()
        edge = mqtt_links(mosquitto, client_id="door-1")
        good = wire(faces[0], site=SITE, fingerprint=fp)
        corrupt_crop = replace(wire(faces[1], site=SITE, fingerprint=fp), crop_jpeg="/9j/" + "A" * 400)
        sent = [
            (topics.edge_unknown("door-1"), good.to_json()),
            (topics.edge_unknown("door-1"), good.to_json()),  # redelivered
            (topics.edge_unknown("door-1"), wire(faces[1], site="lab", fingerprint=fp).to_json()),  # not opted in
            (topics.edge_unknown("door-2"), wire(faces[2], site=SITE, fingerprint=fp).to_json()),  # another device
            (topics.edge_unknown("door-1"), wire(faces[3], site=SITE, fingerprint="other-encoder").to_json()),
            (topics.edge_unknown("door-1"), corrupt_crop.to_json()),
            (topics.edge_unknown("door-1"), b'{"schema": "faceattend.unknown_face", "schema_version": "1.1"}'),
            (topics.edge_unknown("door-1"), b"\xff" * 300_000),
        ]
        for topic, payload in sent:
            assert edge.publish(topic, payload, qos=1).wait(10)
        assert wait_until(lambda: ingest.stats().received == len(sent), timeout=20), ingest.stats()
    finally:
        ingest.stop()
    stats = ingest.stats()
    assert (stats.stored, stats.duplicates) == (1, 1), stats
    assert dict(stats.rejected) == {
        "site_not_opted_in": 1,
        "device_mismatch": 1,
        "foreign_encoder": 1,
        "bad_crop": 1,
        "invalid": 2,
    }
    [stored] = store.list_unknown_faces(SITE)
    assert stored.face.face_id == good.face_id and store.unknown_face_crops([stored.id])[stored.id] == faces[0].crop
    assert store.list_unknown_faces("lab") == []


def test_new_templates_keep_a_thumbnail_unless_configured_not_to(tmp_path: Path, pipeline: FacePipeline) -> None:
    photo = real_faces(pipeline, {"Elon_Musk": 1})[0].photo.read_bytes()
    for keep in (True, False):
        store = Store.open(tmp_path / f"{keep}.db")
        try:
            enroller = Enroller(store, pipeline, EnrollmentSection(keep_thumbnails=keep))
            assert enroller.enroll("elon", "Elon", SITE, [("e.jpg", photo)]).added == 1
            [t] = store.list_templates(person_id="elon")
            thumb = store.template_thumbnail(t.id)
            assert t.has_thumbnail is keep and (thumb is not None) is keep
            if keep:
                assert thumb[:3] == b"\xff\xd8\xff" and len(thumb) < 20_000
        finally:
            store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path):
    s = Store.open(tmp_path / "visitors.db")
    yield s
    s.close()
