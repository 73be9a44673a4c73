"""The wire contract: topics, the JSON envelope, event / status / ack payloads, the gallery blob, signing, and
gallery assembly from messages in any order. No broker here (see tests/integration/test_mqtt_link.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest

from models.contract import limits, topics
from models.contract.assembler import GalleryAssembler, Verified
from models.contract.codec import SCHEMA_VERSION, canonical_json
from models.contract.events import AttendanceEvent, EventsStored, new_event
from models.contract.gallery import (
    HEADER_BYTES,
    Gallery,
    GalleryManifest,
    GalleryPerson,
    SiteDecision,
    build_publication,
    decode_blob,
    encode_blob,
    read_manifest,
    signed_bytes,
)
from models.contract.signing import Signer, Verifier
from models.contract.status import EdgeStatus, GalleryAck
from models.contract.timestamps import normalise_utc
from models.contract.unknown_face import UnknownFace, encode_crop
from models.decision.rules import DecisionRule
from models.errors import (
    ConfigError,
    ContractError,
    FingerprintMismatchError,
    GalleryFormatError,
    IntegrityError,
    PayloadError,
    SchemaVersionError,
    SignatureError,
    StaleGalleryError,
    TopicError,
)

FP = "dlib_resnet_v1-0123456789abcdef"
SITE = "hq"

# ---------------------------------------------------------------- topics


def test_topic_builders_and_parse_round_trip():
    assert topics.gallery_manifest("hq") == "faceattend/v1/site/hq/gallery/manifest"
    assert topics.gallery_blob("hq", 7) == "faceattend/v1/site/hq/gallery/blob/7"
    assert topics.edge_status("door-1") == "faceattend/v1/edge/door-1/status"
    assert topics.edge_events("door-1") == "faceattend/v1/edge/door-1/events"
    assert topics.gallery_ack("door-1") == "faceattend/v1/edge/door-1/gallery/ack"
    assert topics.events_stored("door-1") == "faceattend/v1/device/door-1/stored"
    cases = {
        topics.gallery_manifest("hq"): topics.ParsedTopic(topics.TopicKind.GALLERY_MANIFEST, site="hq"),
        topics.gallery_blob("hq", 4095): topics.ParsedTopic(topics.TopicKind.GALLERY_BLOB, site="hq", index=4095),
        topics.edge_status("d.1"): topics.ParsedTopic(topics.TopicKind.EDGE_STATUS, device="d.1"),
        topics.edge_events("d_1"): topics.ParsedTopic(topics.TopicKind.EDGE_EVENTS, device="d_1"),
        topics.gallery_ack("D1"): topics.ParsedTopic(topics.TopicKind.GALLERY_ACK, device="D1"),
        topics.events_stored("d-1"): topics.ParsedTopic(topics.TopicKind.EVENTS_STORED, device="d-1"),
    }
    for topic, parsed in cases.items():
        assert topics.parse_topic(topic) == parsed


def test_filters_cover_their_topics():
    import paho.mqtt.client as mqtt

    for f in topics.SERVER_FILTERS:
        assert mqtt.topic_matches_sub(f, f.replace("+", "door-9"))
    assert mqtt.topic_matches_sub(topics.ALL_EDGE_EVENTS, topics.edge_events("door-9"))
    assert mqtt.topic_matches_sub(topics.ALL_EDGE_STATUS, topics.edge_status("door-9"))
    assert mqtt.topic_matches_sub(topics.ALL_GALLERY_ACKS, topics.gallery_ack("door-9"))
    site_filter = topics.site_gallery_filter("hq")
    assert mqtt.topic_matches_sub(site_filter, topics.gallery_manifest("hq"))
    assert mqtt.topic_matches_sub(site_filter, topics.gallery_blob("hq", 3))
    assert not mqtt.topic_matches_sub(site_filter, topics.gallery_manifest("hq2"))
    assert mqtt.topic_matches_sub(topics.ALL_EVENTS_STORED, topics.events_stored("door-9"))
    # what the server writes to edges is outside what a device writes (its ACL: faceattend/v1/edge/{device}/#)
    assert not mqtt.topic_matches_sub(f"{topics.ROOT}/edge/door-9/#", topics.events_stored("door-9"))


@pytest.mark.parametrize("bad", ["", "+", "#", "a/b", "a+", "-lead", ".x", "x" * 65, "é", "a b", None, 3])
def test_bad_ids_are_refused(bad):
    with pytest.raises(TopicError):
        topics.validate_id(bad, "site")
    with pytest.raises(TopicError):
        topics.edge_events(bad)


def test_id_limits_accepted():
    assert topics.validate_id("a" * 64) == "a" * 64
    assert topics.validate_id("0") == "0"


@pytest.mark.parametrize("i", [-1, 4096, True, 1.0, "1"])
def test_bad_chunk_index(i):
    with pytest.raises(TopicError):
        topics.gallery_blob("hq", i)


@pytest.mark.parametrize(
    "topic",
    [
        "faceattend/v2/site/hq/gallery/manifest",
        "faceattend/v1/site/hq/gallery",
        "faceattend/v1/site/hq/gallery/manifest/x",
        "faceattend/v1/site/hq/gallery/blob/01",
        "faceattend/v1/site/hq/gallery/blob/-1",
        "faceattend/v1/site/hq/gallery/blob/4096",
        "faceattend/v1/site/hq/gallery/blob/",
        "faceattend/v1/site/+/gallery/manifest",
        "faceattend/v1/edge/door/other",
        "faceattend/v1/edge//status",
        "faceattend/v1/edge/door/gallery/ack/x",
        "faceattend/v1/device/door/stored/x",
        "faceattend/v1/device/door",
        "faceattend/v1/device/+/stored",
        "other/v1/edge/door/status",
        "",
    ],
)
def test_parse_topic_refuses(topic):
    with pytest.raises(TopicError):
        topics.parse_topic(topic)


# ---------------------------------------------------------------- envelope


def event(**over) -> AttendanceEvent:
    fields = dict(
        event_id="6f1c1f8e-64c4-4b6e-9a57-1f0e2b7d4c11",
        seq=41,
        device_id="door-1",
        site=SITE,
        camera="cam0",
        track_id=7,
        person_id="p-0001",
        name="Ada Lovelace",
        distance=0.3125,
        margin=0.125,
        threshold=0.6,
        gallery_version=3,
        fingerprint=FP,
        ts="2026-01-02T03:04:05.123456Z",
        snapshot="snapshots/2026-01-02/door-1-41.jpg",
    )
    fields.update(over)
    return AttendanceEvent(**fields)


def wire(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def test_unknown_fields_are_ignored_and_minor_versions_accepted():
    obj = event().to_object()
    obj["future_field"] = {"anything": [1, 2]}
    obj["schema_version"] = "1.7"
    assert AttendanceEvent.from_json(wire(obj)) == event()


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.1"])
def test_unknown_major_is_refused(version):
    obj = event().to_object()
    obj["schema_version"] = version
    with pytest.raises(SchemaVersionError, match="major"):
        AttendanceEvent.from_json(wire(obj))


@pytest.mark.parametrize("version", [None, 1, 1.0, "1", "1.0.0", "v1.0", "01.0", ""])
def test_malformed_version_is_refused(version):
    obj = event().to_object()
    obj["schema_version"] = version
    with pytest.raises(PayloadError, match="schema_version"):
        AttendanceEvent.from_json(wire(obj))


def test_missing_version_and_wrong_schema():
    obj = event().to_object()
    del obj["schema_version"]
    with pytest.raises(PayloadError, match="schema_version"):
        AttendanceEvent.from_json(wire(obj))
    obj = event().to_object()
    obj["schema"] = "faceattend.edge_status"
    with pytest.raises(PayloadError, match="'schema'"):
        AttendanceEvent.from_json(wire(obj))


@pytest.mark.parametrize("field", ["event_id", "seq", "ts", "person_id", "threshold", "fingerprint"])
def test_missing_required_field_is_named(field):
    obj = event().to_object()
    del obj[field]
    with pytest.raises(PayloadError, match=f"missing required field '{field}'"):
        AttendanceEvent.from_json(wire(obj))


def test_optional_field_may_be_absent():
    obj = event().to_object()
    del obj["snapshot"]
    assert AttendanceEvent.from_json(wire(obj)).snapshot is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", "41"),
        ("seq", 4.0),
        ("seq", True),
        ("seq", None),
        ("track_id", [1]),
        ("threshold", "0.6"),
        ("threshold", None),
        ("distance", True),
        ("person_id", 17),
        ("camera", None),
        ("gallery_version", 2**63),
    ],
)
def test_mistyped_field_is_named(field, value):
    obj = event().to_object()
    obj[field] = value
    with pytest.raises(PayloadError, match=f"'{field}'"):
        AttendanceEvent.from_json(wire(obj))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", "not-a-uuid"),
        ("seq", -1),
        ("device_id", "a/b"),
        ("site", "+"),
        ("camera", ""),
        ("camera", "c" * 65),
        ("track_id", -2),
        ("person_id", ""),
        ("distance", -0.1),
        ("ts", "2026-01-02T03:04:05"),
        ("ts", "2026-01-02T03:04:05+01:00"),
        ("ts", "2026-02-30T03:04:05Z"),
        ("ts", "yesterday"),
        ("snapshot", "s" * 513),
        ("fingerprint", ""),
    ],
)
def test_semantic_checks_name_the_field(field, value):
    obj = event().to_object()
    obj[field] = value
    with pytest.raises(PayloadError, match=f"'{field}'"):
        AttendanceEvent.from_json(wire(obj))


def test_ints_accepted_for_floats_and_normalised():
    obj = event().to_object()
    obj["threshold"] = 1
    got = AttendanceEvent.from_json(wire(obj))
    assert got.threshold == 1.0 and isinstance(got.threshold, float)
    assert b'"threshold":1.0' in got.to_json()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe{}",
        b'{"schema": "faceattend.attendance_event"',
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"schema": "x", "schema": "faceattend.attendance_event"}',
        b"[" * 100_000,
        b'{"a": ' + b"1" * 5000 + b"}",
    ],
)
def test_malformed_payloads_are_payload_errors(payload):
    with pytest.raises(PayloadError):
        AttendanceEvent.from_json(payload[: limits.MAX_EVENT_BYTES])


def test_size_is_checked_before_parsing():
    big = b'{"pad":"' + b"x" * limits.MAX_EVENT_BYTES + b'"}'
    with pytest.raises(PayloadError, match="exceeds"):
        AttendanceEvent.from_json(big)
    with pytest.raises(PayloadError, match="exceeds"):
        AttendanceEvent.from_json(b"\xff" * (limits.MAX_EVENT_BYTES + 1))  # not even UTF-8: size wins


def test_non_bytes_payload_refused():
    with pytest.raises(PayloadError, match="bytes"):
        AttendanceEvent.from_json(event().to_json().decode())  # type: ignore[arg-type]


def test_nan_cannot_be_constructed():
    with pytest.raises(PayloadError, match="'margin'"):
        event(margin=float("nan"))


# ---------------------------------------------------------------- event / status / ack


def test_event_round_trip_and_normalisation():
    e = event(event_id="6F1C1F8E-64C4-4B6E-9A57-1F0E2B7D4C11", ts="2026-01-02T03:04:05.1234567+00:00")
    assert e.event_id == "6f1c1f8e-64c4-4b6e-9a57-1f0e2b7d4c11"
    assert e.ts == "2026-01-02T03:04:05.123456Z"
    assert AttendanceEvent.from_json(e.to_json()) == e
    assert AttendanceEvent.from_json(e.to_json()).to_json() == e.to_json()


def test_unknown_face_event():
    e = event(person_id=None, name=None, distance=None, margin=None, snapshot=None)
    assert AttendanceEvent.from_json(e.to_json()) == e


def test_new_event_generates_uuid_and_utc_ts():
    a = new_event(
        seq=0,
        device_id="door-1",
        site=SITE,
        camera="cam0",
        track_id=1,
        person_id=None,
        name=None,
        distance=None,
        margin=None,
        threshold=0.6,
        gallery_version=0,
        fingerprint=FP,
    )
    b = dataclasses.replace(a, event_id=new_event(**_event_kwargs(a)).event_id)
    assert a.event_id != b.event_id
    assert a.ts.endswith("Z") and normalise_utc(a.ts) == a.ts


def _event_kwargs(e: AttendanceEvent) -> dict:
    d = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
    d.pop("event_id")
    return d


def status(**over) -> EdgeStatus:
    fields = dict(
        state="online",
        device_id="door-1",
        site=SITE,
        agent_version="0.1.0",
        gallery_version=3,
        fingerprint=FP,
        ts="2026-01-02T03:04:05Z",
        health={"fps": 14.5, "outbox_depth": 0, "camera": "ok", "gpu": {"temp_c": 51, "engine": "trt"}},
    )
    fields.update(over)
    return EdgeStatus(**fields)


def test_status_round_trip():
    s = status()
    again = EdgeStatus.from_json(s.to_json())
    assert again == s and again.to_json() == s.to_json()
    assert EdgeStatus.from_json(status(state="offline", gallery_version=None, health={}).to_json()).state == "offline"


def test_status_health_is_read_only():
    s = status()
    with pytest.raises(TypeError):
        s.health["fps"] = 0  # type: ignore[index]


@pytest.mark.parametrize(
    "health",
    [
        {"a": [1, 2]},
        {"a": None},
        {"a": {"b": {"c": {"d": 1}}}},
        {f"k{i}": i for i in range(257)},
        {"": 1},
        {"k" * 65: 1},
        {"s": "x" * 257},
        {"n": float("inf")},
    ],
)
def test_status_health_bounds(health):
    with pytest.raises(PayloadError, match="health"):
        status(health=health)


def test_status_state_and_fields():
    with pytest.raises(PayloadError, match="'state'"):
        status(state="sleeping")
    obj = status().to_object()
    obj["health"] = "fine"
    with pytest.raises(PayloadError, match="'health'"):
        EdgeStatus.from_json(wire(obj))


def test_ack_round_trip_and_rules():
    ok = GalleryAck(device_id="door-1", site=SITE, version=3, status="ok", error=None, ts="2026-01-02T03:04:05Z")
    assert GalleryAck.from_json(ok.to_json()) == ok
    err = dataclasses.replace(ok, status="error", error="fingerprint mismatch")
    assert GalleryAck.from_json(err.to_json()) == err
    with pytest.raises(PayloadError, match="'error'"):
        dataclasses.replace(ok, status="error", error=None)
    with pytest.raises(PayloadError, match="'error'"):
        dataclasses.replace(ok, error="but why")
    with pytest.raises(PayloadError, match="'version'"):
        dataclasses.replace(ok, version=0)


def stored(**over) -> EventsStored:
    fields = dict(
        device_id="door-1",
        event_ids=("6a8f1c2e-0b9d-4e3f-a1b2-c3d4e5f60718", "0b5e7d3a-2f59-4a53-8f0e-7d1c2b3a4f50"),
        ts="2026-01-02T03:04:07Z",
    )
    fields.update(over)
    return EventsStored(**fields)


def test_events_stored_round_trip_and_rules():
    msg = stored(event_ids=("6A8F1C2E-0B9D-4E3F-A1B2-C3D4E5F60718",))
    assert msg.event_ids == ("6a8f1c2e-0b9d-4e3f-a1b2-c3d4e5f60718",)  # one spelling, as the outbox stores it
    assert EventsStored.from_json(msg.to_json()) == msg
    with pytest.raises(PayloadError, match="'event_ids' must not be empty"):
        stored(event_ids=())
    with pytest.raises(PayloadError, match="not a UUID"):
        stored(event_ids=("seq-7",))
    with pytest.raises(PayloadError, match="twice"):
        stored(event_ids=("6a8f1c2e-0b9d-4e3f-a1b2-c3d4e5f60718", "6A8F1C2E-0B9D-4E3F-A1B2-C3D4E5F60718"))
    with pytest.raises(PayloadError, match="limit"):
        stored(event_ids=tuple(str(uuid.UUID(int=i)) for i in range(limits.MAX_STORED_IDS + 1)))
    with pytest.raises(PayloadError, match="'device_id'"):
        stored(device_id="a/b")
    # the most ids a confirmation may hold fit its size limit
    largest = stored(event_ids=tuple(str(uuid.UUID(int=2**128 - 1 - i)) for i in range(limits.MAX_STORED_IDS)))
    assert len(largest.to_json()) <= limits.MAX_STORED_BYTES


def test_each_kind_checks_its_own_schema():
    with pytest.raises(PayloadError, match="'schema'"):
        EdgeStatus.from_json(event().to_json())
    with pytest.raises(PayloadError, match="'schema'"):
        GalleryAck.from_json(status().to_json())
    with pytest.raises(PayloadError, match="'schema'"):
        EventsStored.from_json(event().to_json())


# ---------------------------------------------------------------- gallery blob


def make_gallery(dtype: str = "float32", n: int = 6, dim: int = 8, version: int = 1, seed: int = 0) -> Gallery:
    rng = np.random.default_rng(seed)
    people = (GalleryPerson("p-0001", "Ada"), GalleryPerson("p-0002", "Émile Zoë"), GalleryPerson("p-0003", ""))
    return Gallery(
        site=SITE,
        version=version,
        fingerprint=FP,
        metric="euclidean",
        dtype=dtype,
        embeddings=rng.normal(size=(n, dim)).astype(np.float32),
        labels=np.arange(n) % len(people),
        people=people,
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_blob_round_trip(dtype):
    signer = Signer.generate()
    g = make_gallery(dtype)
    manifest, chunks = build_publication(g, signer, chunk_size=64)
    blob = b"".join(chunks)
    assert blob == encode_blob(g)
    assert len(blob) == HEADER_BYTES + 6 * 8 * (4 if dtype == "float32" else 2) + 6 * 4 + sum(
        4 + len(p.person_id.encode()) + len(p.name.encode()) for p in g.people
    )
    back = decode_blob(blob, manifest)
    assert back.dtype == dtype and back.embeddings.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.embeddings, g.embeddings)
    np.testing.assert_array_equal(back.labels, g.labels)
    assert back.labels.dtype == np.int32
    assert back.people == g.people
    assert (back.site, back.version, back.fingerprint) == (SITE, 1, FP)
    assert not back.embeddings.flags.writeable


def test_empty_gallery_round_trip():
    g = Gallery(SITE, 2, FP, "euclidean", "float32", np.zeros((0, 128), np.float32), np.zeros(0, np.int32), ())
    manifest, chunks = build_publication(g, Signer.generate())
    assert manifest.count == 0 and manifest.chunk_count == 1
    back = decode_blob(b"".join(chunks), manifest)
    assert back.count == 0 and back.dim == 128 and back.people == ()


def test_blob_layout_is_little_endian_as_documented():
    g = make_gallery(n=2, dim=3)
    blob = encode_blob(g)
    assert blob[:4] == b"FAGB"
    assert struct.unpack_from("<HBHII", blob, 4) == (1, 1, 3, 2, 3)
    first = struct.unpack_from("<3f", blob, HEADER_BYTES)
    np.testing.assert_array_equal(np.array(first, np.float32), g.embeddings[0])
    assert struct.unpack_from("<2I", blob, HEADER_BYTES + 2 * 3 * 4) == (0, 1)


def test_every_truncation_is_refused():
    signer = Signer.generate()
    g = make_gallery(n=3, dim=4)
    manifest, chunks = build_publication(g, signer)
    blob = b"".join(chunks)
    for cut in range(len(blob)):
        with pytest.raises(GalleryFormatError):
            decode_blob(blob[:cut], manifest)
    with pytest.raises(GalleryFormatError, match="trailing"):
        decode_blob(blob + b"\x00", manifest)


def _patched(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_hostile_length_fields_are_refused():
    g = make_gallery(n=3, dim=4)
    manifest, chunks = build_publication(g, Signer.generate())
    blob = b"".join(chunks)
    # count * dim far beyond the bytes present: refused before any allocation, whatever the manifest says
    with pytest.raises(GalleryFormatError, match="truncated"):
        decode_blob(_patched(blob, 9, "<I", 0xFFFFFFFF), manifest)
    with pytest.raises(GalleryFormatError, match="truncated"):
        decode_blob(_patched(blob, 7, "<H", 4096), manifest)
    # the header disagrees with the signed manifest
    with pytest.raises(GalleryFormatError, match="count"):
        decode_blob(_patched(blob, 9, "<I", 2), manifest)
    with pytest.raises(GalleryFormatError, match="dim"):
        decode_blob(_patched(blob, 7, "<H", 3), manifest)
    with pytest.raises(GalleryFormatError, match="dim"):
        decode_blob(_patched(blob, 7, "<H", 0), manifest)
    with pytest.raises(GalleryFormatError, match="truncated"):
        decode_blob(_patched(blob, 13, "<I", 0xFFFFFFFF), manifest)
    with pytest.raises(GalleryFormatError, match="people"):
        decode_blob(_patched(blob, 13, "<I", 2), manifest)
    with pytest.raises(GalleryFormatError, match="magic"):
        decode_blob(b"XXXX" + blob[4:], manifest)
    with pytest.raises(GalleryFormatError, match="format version"):
        decode_blob(_patched(blob, 4, "<H", 2), manifest)
    with pytest.raises(GalleryFormatError, match="dtype code"):
        decode_blob(_patched(blob, 6, "<B", 9), manifest)
    # a person-id length pointing past the end
    table = HEADER_BYTES + 3 * 4 * 4 + 3 * 4
    with pytest.raises(GalleryFormatError, match="truncated"):
        decode_blob(_patched(blob, table, "<H", 0xFFFF), manifest)
    # a label outside the people table
    with pytest.raises(GalleryFormatError, match="label"):
        decode_blob(_patched(blob, HEADER_BYTES + 3 * 4 * 4, "<I", 3), manifest)
    # invalid UTF-8 in a name
    pid_len = len(g.people[0].person_id)
    bad = bytearray(blob)
    bad[table + 2] = 0xFF
    with pytest.raises(GalleryFormatError, match="UTF-8"):
        decode_blob(bytes(bad), manifest)
    assert pid_len > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_refused(bad):
    g = make_gallery(n=3, dim=4)
    manifest, chunks = build_publication(g, Signer.generate())
    blob = bytearray(b"".join(chunks))
    struct.pack_into("<f", blob, HEADER_BYTES + 4 * 4 + 8, bad)  # row 1
    with pytest.raises(GalleryFormatError, match="row 1"):
        decode_blob(bytes(blob), manifest)
    with pytest.raises(GalleryFormatError, match="finite"):
        Gallery(SITE, 1, FP, "euclidean", "float32", np.array([[0.0, bad]]), np.array([0]), (GalleryPerson("a", ""),))


def test_float16_overflow_is_refused():
    with pytest.raises(GalleryFormatError, match="finite"):
        Gallery(SITE, 1, FP, "euclidean", "float16", np.array([[1e6, 0.0]]), np.array([0]), (GalleryPerson("a", ""),))


def test_gallery_invariants():
    p = (GalleryPerson("a", "A"),)
    emb = np.zeros((2, 4), np.float32)
    with pytest.raises(GalleryFormatError, match="appears twice"):
        Gallery(SITE, 1, FP, "euclidean", "float32", emb, np.array([0, 0]), p + p)
    with pytest.raises(GalleryFormatError, match="label"):
        Gallery(SITE, 1, FP, "euclidean", "float32", emb, np.array([0, 1]), p)
    with pytest.raises(GalleryFormatError, match="labels"):
        Gallery(SITE, 1, FP, "euclidean", "float32", emb, np.array([0]), p)
    with pytest.raises(GalleryFormatError, match="version"):
        Gallery(SITE, 0, FP, "euclidean", "float32", emb, np.array([0, 0]), p)
    with pytest.raises(GalleryFormatError, match="metric"):
        Gallery(SITE, 1, FP, "cosine", "float32", emb, np.array([0, 0]), p)
    with pytest.raises(GalleryFormatError, match="site"):
        Gallery("a/b", 1, FP, "euclidean", "float32", emb, np.array([0, 0]), p)
    with pytest.raises(GalleryFormatError, match="person_id"):
        GalleryPerson("", "nobody")


def test_gallery_does_not_alias_caller_arrays():
    emb = np.ones((1, 4), np.float32)
    g = Gallery(SITE, 1, FP, "euclidean", "float32", emb, np.array([0]), (GalleryPerson("a", ""),))
    emb[0, 0] = 5
    assert g.embeddings[0, 0] == 1
    assert emb.flags.writeable


def test_publication_limits():
    g = make_gallery()
    with pytest.raises(ConfigError):
        build_publication(g, Signer.generate(), chunk_size=0)
    with pytest.raises(ConfigError):
        build_publication(g, Signer.generate(), chunk_size=limits.MAX_CHUNK_SIZE + 1)
    with pytest.raises(ConfigError, match="chunks"):
        build_publication(make_gallery(n=200, dim=64), Signer.generate(), chunk_size=8)


def test_manifest_consistency_checks():
    manifest, _ = build_publication(make_gallery(), Signer.generate(), chunk_size=64)
    with pytest.raises(PayloadError, match="chunk_count"):
        dataclasses.replace(manifest, chunk_count=manifest.chunk_count + 1)
    with pytest.raises(PayloadError, match="chunk_sha256"):
        dataclasses.replace(manifest, chunk_sha256=manifest.chunk_sha256[:-1])
    with pytest.raises(PayloadError, match=r"chunk_sha256\[0\]"):
        dataclasses.replace(manifest, chunk_sha256=("X" * 64, *manifest.chunk_sha256[1:]))
    with pytest.raises(PayloadError, match="blob_size"):
        dataclasses.replace(manifest, count=10**9)
    with pytest.raises(PayloadError, match="chunk_size"):
        dataclasses.replace(manifest, chunk_size=limits.MAX_CHUNK_SIZE + 1)
    with pytest.raises(PayloadError, match="metric"):
        dataclasses.replace(manifest, metric="cosine")
    with pytest.raises(PayloadError, match="signature"):
        dataclasses.replace(manifest, signature="AAAA")
    assert manifest.chunk_length(0) == 64
    assert manifest.chunk_length(manifest.chunk_count - 1) == manifest.blob_size - 64 * (manifest.chunk_count - 1)


def test_largest_legal_manifest_fits_its_size_limit():
    digests = tuple(hashlib.sha256(str(i).encode()).hexdigest() for i in range(limits.MAX_CHUNK_COUNT))
    m = GalleryManifest(
        site="s" * 64,
        version=2**62,
        fingerprint="f" * limits.MAX_FINGERPRINT_CHARS,
        dim=128,
        metric="euclidean",
        dtype="float32",
        count=1000,
        people=1000,
        blob_size=limits.MAX_CHUNK_COUNT * 1024,
        chunk_count=limits.MAX_CHUNK_COUNT,
        chunk_size=1024,
        blob_sha256="0" * 64,
        chunk_sha256=digests,
        created="2026-01-01T00:00:00Z",
        key_id="0" * 16,
        signature="",
    )
    assert len(m.to_json()) + 200 < limits.MAX_MANIFEST_BYTES


# ---------------------------------------------------------------- signing


def test_signing_round_trip_and_key_files(tmp_path):
    signer = Signer.generate()
    key_path = tmp_path / "keys" / "gallery.key"
    signer.save(key_path)
    assert (key_path.stat().st_mode & 0o777) == 0o600
    again = Signer.load(key_path)
    assert again.key_id == signer.key_id and len(signer.key_id) == 16
    pub = tmp_path / "gallery.pub"
    signer.save_public(pub)
    for verifier in (
        Verifier.from_pem_file(pub),
        Verifier.from_string(signer.verifier.public_pem()),
        Verifier.from_string(signer.verifier.public_b64()),
    ):
        assert verifier.key_id == signer.key_id
        verifier.verify(b"data", again.sign(b"data"))
        with pytest.raises(SignatureError):
            verifier.verify(b"datA", again.sign(b"data"))
    with pytest.raises(SignatureError):
        Signer.generate().verifier.verify(b"data", signer.sign(b"data"))


def test_key_id_is_sha256_of_raw_public_key():
    import base64

    signer = Signer.generate()
    raw = base64.b64decode(signer.verifier.public_b64())
    assert signer.key_id == hashlib.sha256(raw).hexdigest()[:16]


def test_bad_keys_are_config_errors(tmp_path, caplog):
    with pytest.raises(ConfigError):
        Verifier.from_string("not a key!")
    with pytest.raises(ConfigError, match="32 bytes"):
        Verifier.from_string("AAAA")
    with pytest.raises(ConfigError):
        Verifier.from_pem_file(tmp_path / "missing.pub")
    bad = tmp_path / "bad.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError):
        Signer.load(bad)
    loose = tmp_path / "loose.key"
    Signer.generate().save(loose)
    os.chmod(loose, 0o644)
    with caplog.at_level(logging.WARNING):
        Signer.load(loose)
    assert "readable by group/others" in caplog.text


def test_manifest_signature_verifies_and_tampering_is_detected():
    signer = Signer.generate()
    manifest, _ = build_publication(make_gallery(), signer)
    payload = manifest.to_json()
    assert read_manifest(payload, signer.verifier) == manifest
    obj = json.loads(payload)
    # the signature covers the canonical JSON without "signature"
    signer.verifier.verify_b64(canonical_json({k: v for k, v in obj.items() if k != "signature"}), obj["signature"])
    for key, value in [("version", 99), ("count", 5), ("blob_sha256", "0" * 64), ("fingerprint", "other")]:
        tampered = dict(obj, **{key: value})
        with pytest.raises(ContractError):
            read_manifest(wire(tampered), signer.verifier)
    # a field added by a newer minor version is covered by the signature too
    newer = dict(obj, schema_version="1.4", hint="x")
    newer["signature"] = signer.sign_b64(signed_bytes(newer))
    assert dataclasses.replace(read_manifest(wire(newer), signer.verifier), signature="") == dataclasses.replace(
        manifest, signature=""
    )
    with pytest.raises(SignatureError):
        read_manifest(wire(dict(newer, hint="y")), signer.verifier)


def test_manifest_from_another_key_is_refused():
    trusted, forger = Signer.generate(), Signer.generate()
    forged, _ = build_publication(make_gallery(), forger)
    with pytest.raises(SignatureError, match="signed by key"):
        read_manifest(forged.to_json(), trusted.verifier)
    # claiming the trusted key id does not help: the signature does not verify
    claimed = dataclasses.replace(forged, key_id=trusted.key_id)
    with pytest.raises(SignatureError, match="does not verify"):
        read_manifest(claimed.to_json(), trusted.verifier)
    unsigned = dataclasses.replace(forged, key_id=trusted.key_id, signature="")
    with pytest.raises(SignatureError, match="not signed"):
        read_manifest(unsigned.to_json(), trusted.verifier)


# ---------------------------------------------------------------- the site's decision (1.1)

SITE_DECISION = SiteDecision(DecisionRule.ratio(0.84, 0.5), 0.01, 212, 180, 3000, "2026-12-06T10:00:00Z")


def test_manifest_with_and_without_a_site_decision_round_trips():
    signer = Signer.generate()
    plain, _ = build_publication(make_gallery(), signer)
    assert "decision" not in json.loads(plain.to_json())  # absent, not null: the encoder's default
    assert read_manifest(plain.to_json(), signer.verifier).site_decision is None
    manifest, chunks = build_publication(dataclasses.replace(make_gallery(), decision=SITE_DECISION), signer)
    obj = json.loads(manifest.to_json())
    # numbers as decimal strings: the signed JSON stays free of floats
    assert obj["decision"] == {
        "rule": "ratio",
        "threshold": "0.84",
        "max_distance": "0.5",
        "target_fpir": "0.01",
        "people": 212,
        "probes": 180,
        "strangers": 3000,
        "calibrated": "2026-12-06T10:00:00.000000Z",
    }
    read = read_manifest(manifest.to_json(), signer.verifier)
    assert read.site_decision == SITE_DECISION and read.to_json() == manifest.to_json()
    assert decode_blob(b"".join(chunks), read).decision == SITE_DECISION
    # no cap (inf) and a distance rule (no max_distance key) survive the trip exactly
    for rule in (DecisionRule.margin(0.07, float("inf")), DecisionRule.distance(0.4123456789)):
        other = dataclasses.replace(SITE_DECISION, rule=rule)
        m, _ = build_publication(dataclasses.replace(make_gallery(), decision=other), signer)
        assert read_manifest(m.to_json(), signer.verifier).site_decision == other


def test_the_signature_covers_the_site_decision():
    signer = Signer.generate()
    manifest, _ = build_publication(dataclasses.replace(make_gallery(), decision=SITE_DECISION), signer)
    obj = json.loads(manifest.to_json())
    for change in ({"threshold": "0.99"}, {"max_distance": "0.9"}, {"rule": "margin"}, {"strangers": 1}):
        with pytest.raises(SignatureError):
            read_manifest(wire(dict(obj, decision={**obj["decision"], **change})), signer.verifier)
    removed = {k: v for k, v in obj.items() if k != "decision"}
    with pytest.raises(SignatureError):  # stripping the site's rule is tampering too
        read_manifest(wire(removed), signer.verifier)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": 0.84}, "decision.threshold must be a decimal string"),
        ({"threshold": "nan"}, "decision.threshold must be a decimal string"),
        ({"threshold": " 0.8"}, "decision.threshold must be a decimal string"),
        ({"threshold": "1.5"}, "ratio threshold"),
        ({"rule": "cosine"}, "unknown rule"),
        ({"max_distance": "-1.0"}, "max_distance must be > 0"),
        ({"target_fpir": "1.0"}, "target_fpir must be in"),
        ({"people": -3}, "people must be an integer"),
        ({"probes": "180"}, "probes must be an integer"),
        ({"calibrated": "yesterday"}, "calibrated"),
        ({"strangers": None}, "strangers must be an integer"),
    ],
)
def test_a_malformed_site_decision_is_refused_on_decode(change, match):
    signer = Signer.generate()
    manifest, _ = build_publication(dataclasses.replace(make_gallery(), decision=SITE_DECISION), signer)
    obj = json.loads(manifest.to_json())
    obj["decision"] = {**obj["decision"], **change}
    obj["signature"] = signer.sign_b64(signed_bytes(obj))  # genuinely signed: refused for its content
    with pytest.raises(GalleryFormatError, match=match):
        read_manifest(wire(obj), signer.verifier)
    for broken in ("ratio 0.8", ["ratio"]):  # not an object: a wire-type error like any mistyped field
        with pytest.raises(PayloadError, match="field 'decision' must be an object"):
            GalleryManifest.from_json(wire(dict(obj, decision=broken)))
    incomplete = {k: v for k, v in SITE_DECISION.to_wire().items() if k != "calibrated"}
    with pytest.raises(GalleryFormatError, match="decision lacks calibrated"):
        GalleryManifest.from_json(wire(dict(obj, decision=incomplete)))


def test_a_distance_rule_with_a_cap_is_refused():
    wire_form = dict(SITE_DECISION.to_wire(), rule="distance", threshold="0.5")
    with pytest.raises(GalleryFormatError, match="max_distance applies to the ratio and margin rules only"):
        SiteDecision.from_wire(wire_form)


# ---------------------------------------------------------------- assembler


class Publication:
    def __init__(self, signer: Signer, version: int, chunk_size: int = 64, seed: int = 0, fp: str = FP, epoch: int = 0):
        g = dataclasses.replace(make_gallery(version=version, seed=seed, n=10, dim=16), fingerprint=fp, epoch=epoch)
        self.gallery = g
        self.manifest, self.chunks = build_publication(g, signer, chunk_size=chunk_size)
        assert self.manifest.chunk_count >= 4

    def manifest_msg(self) -> tuple[str, bytes]:
        return topics.gallery_manifest(SITE), self.manifest.to_json()

    def chunk_msgs(self) -> list[tuple[str, bytes]]:
        return [(topics.gallery_blob(SITE, i), c) for i, c in enumerate(self.chunks)]


def feed_all(asm: GalleryAssembler, msgs: list[tuple[str, bytes]]) -> list[Gallery]:
    return [g for g in (asm.feed(t, p) for t, p in msgs) if g is not None]


def same(a: Gallery, b: Gallery) -> bool:
    return (
        a.version == b.version
        and a.people == b.people
        and np.array_equal(a.embeddings, b.embeddings)
        and np.array_equal(a.labels, b.labels)
    )


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


def test_assembler_manifest_first_out_of_order_chunks(signer):
    pub = Publication(signer, 1)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    msgs = [pub.manifest_msg(), *reversed(pub.chunk_msgs())]
    done = feed_all(asm, msgs)
    assert len(done) == 1 and same(done[0], pub.gallery) and asm.completed_version == 1


def test_assembler_chunks_before_manifest_and_duplicates(signer):
    pub = Publication(signer, 1)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    chunks = pub.chunk_msgs()
    msgs = chunks[2:] + chunks[:1] + chunks[2:] + [pub.manifest_msg()] + chunks[1:2] + chunks + [pub.manifest_msg()]
    done = feed_all(asm, msgs)
    assert len(done) == 1 and same(done[0], pub.gallery)


def test_assembler_ignores_cleared_topics(signer):
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    assert asm.feed(topics.gallery_blob(SITE, 3), b"") is None
    assert asm.feed(topics.gallery_manifest(SITE), b"") is None


def test_assembler_detects_tampered_chunk_and_recovers(signer):
    pub = Publication(signer, 1)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    chunks = pub.chunk_msgs()
    asm.feed(*pub.manifest_msg())
    topic, good = chunks[1]
    with pytest.raises(IntegrityError, match="chunk 1"):
        asm.feed(topic, good[:-1] + bytes([good[-1] ^ 1]))
    done = feed_all(asm, chunks)  # the genuine chunk still completes the gallery
    assert len(done) == 1 and same(done[0], pub.gallery)


def test_assembler_refuses_forged_manifest(signer):
    forger = Signer.generate()
    pub = Publication(forger, 5)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    feed_all(asm, pub.chunk_msgs())
    with pytest.raises(SignatureError):
        asm.feed(*pub.manifest_msg())
    assert asm.completed_version == 0 and asm.pending_version is None


def test_assembler_refuses_other_fingerprint(signer):
    pub = Publication(signer, 2, fp="other_encoder-0000000000000000")
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    with pytest.raises(FingerprintMismatchError, match="other_encoder"):
        asm.feed(*pub.manifest_msg())
    assert feed_all(asm, pub.chunk_msgs()) == []


def test_assembler_refuses_other_site(signer):
    g = dataclasses.replace(make_gallery(), site="branch")
    manifest, _ = build_publication(g, signer)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    with pytest.raises(ContractError, match="branch"):
        asm.feed(topics.gallery_manifest(SITE), manifest.to_json())  # signed for another site, replayed here
    with pytest.raises(TopicError):
        asm.feed(topics.gallery_manifest("branch"), manifest.to_json())
    with pytest.raises(TopicError):
        asm.feed(topics.edge_events("door-1"), b"{}")


def test_assembler_older_version_refused_newer_replaces(signer):
    v1, v2, v3 = (Publication(signer, v, seed=v) for v in (1, 2, 3))
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    assert same(feed_all(asm, [v2.manifest_msg(), *v2.chunk_msgs()])[0], v2.gallery)
    # a stale v1 arriving late changes nothing, and says so (the edge acks it as an error, never silently)
    assert feed_all(asm, v1.chunk_msgs()) == []
    with pytest.raises(StaleGalleryError, match=r"v1 \(epoch 0\) .* older than v2 \(epoch 0\) in service"):
        asm.feed(*v1.manifest_msg())
    assert asm.completed_version == 2 and asm.pending_version is None
    # the release in service, replayed: quietly nothing
    assert asm.feed(*v2.manifest_msg()) is None
    # v3's chunks first (as the server publishes them), then its manifest
    done = feed_all(asm, [*v3.chunk_msgs(), v3.manifest_msg()])
    assert len(done) == 1 and same(done[0], v3.gallery) and asm.completed_version == 3


def test_assembler_newer_manifest_mid_assembly(signer):
    v1, v2 = Publication(signer, 1, seed=1), Publication(signer, 2, seed=2)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    assert feed_all(asm, [v1.manifest_msg(), *v1.chunk_msgs()[:2], v2.manifest_msg()]) == []
    assert asm.pending_version == 2
    # late v1 chunks no longer count; while v2 is incomplete each is reported (stale, newer or tampered alike)
    # (the tail chunks hold labels and people, identical in both versions: those simply count for v2)
    for i, (topic, chunk) in enumerate(v1.chunk_msgs()[2:], start=2):
        if v1.manifest.chunk_sha256[i] == v2.manifest.chunk_sha256[i]:
            assert asm.feed(topic, chunk) is None
            continue
        with pytest.raises(IntegrityError, match="does not match manifest v2"):
            asm.feed(topic, chunk)
    done = feed_all(asm, v2.chunk_msgs())
    assert len(done) == 1 and same(done[0], v2.gallery)


def test_assembler_starts_from_current_version(signer):
    pub = Publication(signer, 4)
    current = Verified(pub.manifest, pub.manifest.to_json(), pub.gallery)
    asm = GalleryAssembler(signer.verifier, FP, SITE, current=current)
    assert feed_all(asm, [pub.manifest_msg(), *pub.chunk_msgs()]) == []
    assert asm.completed is current


def test_a_new_epoch_supersedes_any_version_of_an_older_one_and_older_releases_are_refused(signer):
    """A restored (or moved) server database counts versions from its backup again, under a new epoch: the edge
    must take the new epoch's v3 after the old epoch's v57, and still refuse replays of either epoch's past."""
    old_57 = Publication(signer, 57, seed=1, epoch=1_700_000_000_000)
    old_56 = Publication(signer, 56, seed=2, epoch=1_700_000_000_000)
    new_3 = Publication(signer, 3, seed=3, epoch=1_760_000_000_000)
    new_2 = Publication(signer, 2, seed=4, epoch=1_760_000_000_000)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    assert same(feed_all(asm, [old_57.manifest_msg(), *old_57.chunk_msgs()])[0], old_57.gallery)
    with pytest.raises(StaleGalleryError, match=r"v56 \(epoch 1700000000000\) .* older than v57"):
        asm.feed(*old_56.manifest_msg())

    done = feed_all(asm, [new_3.manifest_msg(), *new_3.chunk_msgs()])
    assert len(done) == 1 and same(done[0], new_3.gallery) and done[0].release == (1_760_000_000_000, 3)
    for replay in (old_57, new_2):  # the old epoch's newest, and the new epoch's past
        with pytest.raises(StaleGalleryError, match="older than v3"):
            asm.feed(*replay.manifest_msg())
    assert asm.completed.manifest.release == (1_760_000_000_000, 3)


def test_a_1_0_manifest_without_epoch_is_read_as_epoch_0_and_any_epoch_supersedes_it(signer):
    pub = Publication(signer, 9, seed=1)
    wire = {k: v for k, v in pub.manifest.to_object().items() if k not in ("epoch", "signature")}
    wire["schema_version"] = "1.0"
    wire["signature"] = signer.sign_b64(signed_bytes(wire))
    old_server = json.dumps(wire).encode()
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    done = feed_all(asm, [(topics.gallery_manifest(SITE), old_server), *pub.chunk_msgs()])
    assert len(done) == 1 and done[0].release == (0, 9) and asm.completed.manifest_bytes == old_server
    upgraded = Publication(signer, 1, seed=2, epoch=1_760_000_000_000)  # the upgraded server's first version
    assert len(feed_all(asm, [upgraded.manifest_msg(), *upgraded.chunk_msgs()])) == 1


def test_a_newer_release_of_the_content_in_service_is_taken_over_without_chunks(signer):
    """A restarted server publishes the same people under a new epoch: the edge needs no download for that."""
    v5 = Publication(signer, 5, seed=1, epoch=10)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    assert len(feed_all(asm, [v5.manifest_msg(), *v5.chunk_msgs()])) == 1
    restarted = dataclasses.replace(v5.gallery, version=6, epoch=20)
    manifest, _ = build_publication(restarted, signer, chunk_size=64)
    assert manifest.blob_sha256 == v5.manifest.blob_sha256
    got = asm.feed(topics.gallery_manifest(SITE), manifest.to_json())
    assert got is not None and got.release == (20, 6) and same(got, restarted) and asm.pending is None
    assert asm.completed.manifest.release == (20, 6) and asm.completed.manifest_bytes == manifest.to_json()


def test_missing_chunks_are_listed_for_a_pending_manifest(signer):
    pub = Publication(signer, 1)
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    assert asm.missing_chunks() == [] and asm.received_chunks == 0
    asm.feed(*pub.manifest_msg())
    chunks = pub.chunk_msgs()
    feed_all(asm, chunks[1:3])
    assert asm.missing_chunks() == [0, *range(3, len(chunks))] and asm.received_chunks == 2
    assert len(feed_all(asm, [chunks[0], *chunks[3:]])) == 1 and asm.missing_chunks() == []


def test_assembler_pool_is_bounded(signer, caplog):
    pub = Publication(signer, 1, chunk_size=64)
    asm = GalleryAssembler(signer.verifier, FP, SITE, pool_cap_bytes=3 * 64)
    chunks = pub.chunk_msgs()
    with caplog.at_level(logging.WARNING):
        feed_all(asm, chunks)  # all before the manifest: only the last three fit
    assert "pool is full" in caplog.text
    assert asm.feed(*pub.manifest_msg()) is None
    done = feed_all(asm, chunks[: len(chunks) - 3])
    assert len(done) == 1 and same(done[0], pub.gallery)


def test_assembler_bad_blob_behind_valid_signature(signer):
    # a server bug: chunks and manifest consistent and signed, but the blob is not a gallery
    pub = Publication(signer, 1)
    bad_blob = b"NOPE" + b"".join(pub.chunks)[4:]
    chunks = [bad_blob[i : i + 64] for i in range(0, len(bad_blob), 64)]
    manifest = dataclasses.replace(
        pub.manifest,
        blob_sha256=hashlib.sha256(bad_blob).hexdigest(),
        chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
        signature="",
    )
    manifest = dataclasses.replace(manifest, signature=signer.sign_b64(signed_bytes(manifest.to_object())))
    asm = GalleryAssembler(signer.verifier, FP, SITE)
    asm.feed(topics.gallery_manifest(SITE), manifest.to_json())
    for i, c in enumerate(chunks[:-1]):
        asm.feed(topics.gallery_blob(SITE, i), c)
    with pytest.raises(GalleryFormatError, match="magic"):
        asm.feed(topics.gallery_blob(SITE, len(chunks) - 1), chunks[-1])
    # replayed after a reconnect: not rebuilt and refused again
    assert asm.feed(topics.gallery_manifest(SITE), manifest.to_json()) is None
    assert asm.pending_version is None and asm.completed_version == 0
    # and a good newer version still goes through
    v2 = Publication(signer, 2)
    assert len(feed_all(asm, [v2.manifest_msg(), *v2.chunk_msgs()])) == 1


# ---------------------------------------------------------------- unknown visitor's face (1.1)

# the markers a JPEG starts and ends with: the codec checks the magic only (the server decodes the image itself)
TINY_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(16)) + b"\xff\xd9"


def unknown_face(**over) -> UnknownFace:
    fields = dict(
        face_id="9a3c1c52-0d7e-4f3b-8a41-6c2e5b1d7f90",
        device_id="door-1",
        site=SITE,
        camera="cam0",
        track_id=12,
        ts="2026-01-02T03:04:07Z",
        fingerprint=FP,
        gallery_version=3,
        distance=0.71875,
        quality=0.625,
        embedding=(0.125, -0.25, 0.5, -1.0),
        crop_jpeg=encode_crop(TINY_JPEG),
    )
    fields.update(over)
    return UnknownFace(**fields)


def test_unknown_face_topic_and_round_trip():
    assert topics.edge_unknown("door-1") == "faceattend/v1/edge/door-1/unknown"
    parsed = topics.parse_topic(topics.edge_unknown("d.1"))
    assert parsed == topics.ParsedTopic(topics.TopicKind.EDGE_UNKNOWN, device="d.1")
    import paho.mqtt.client as mqtt

    assert mqtt.topic_matches_sub(topics.ALL_EDGE_UNKNOWN, topics.edge_unknown("door-9"))
    assert topics.ALL_EDGE_UNKNOWN not in topics.SERVER_FILTERS  # its own subscriber, see enrollment_server
    face = unknown_face(face_id="9A3C1C52-0D7E-4F3B-8A41-6C2E5B1D7F90", ts="2026-01-02T03:04:07+00:00")
    again = UnknownFace.from_json(face.to_json())
    assert again == face and again.face_id == "9a3c1c52-0d7e-4f3b-8a41-6c2e5b1d7f90"
    assert again.ts == "2026-01-02T03:04:07.000000Z" and again.jpeg_bytes() == TINY_JPEG
    assert json.loads(face.to_json())["schema_version"] == SCHEMA_VERSION == "1.1"
    assert unknown_face(distance=None).distance is None  # decided without a gallery


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("face_id", "not-a-uuid", "UUID"),
        ("device_id", "door/1", "valid id"),
        ("quality", 0.0, "quality"),
        ("quality", 1.5, "quality"),
        ("distance", -0.1, ">= 0"),
        ("embedding", (), "embedding"),
        ("embedding", (0.1,) * (limits.MAX_DIM + 1), "embedding"),
        ("embedding", ("x",), "embedding"),
        ("crop_jpeg", "not base64!", "base64"),
        ("crop_jpeg", encode_crop(b"\x89PNG\r\n\x1a\n"), "JPEG"),
        ("crop_jpeg", encode_crop(b"\xff\xd8\xff" + b"\x00" * limits.MAX_UNKNOWN_CROP_BYTES), "limit"),
        ("ts", "2026-01-02 03:04:07", "ts"),
    ],
)
def test_unknown_face_refuses_bad_fields(field, value, why):
    with pytest.raises(PayloadError, match=why):
        unknown_face(**{field: value})


def test_unknown_face_size_is_checked_before_parsing():
    big = unknown_face().to_object()
    big["padding"] = "x" * limits.MAX_UNKNOWN_FACE_BYTES
    with pytest.raises(PayloadError, match="exceeds"):
        UnknownFace.from_json(canonical_json(big))


# ---------------------------------------------------------------- golden payloads
#
# Byte-exact payloads, one folder per schema version (tests/golden/<MAJOR.MINOR>/), frozen once written. The writer
# must reproduce its own version's folder byte for byte (a failure means the wire format changed: bump the schema
# version, minor for an added optional field, major for anything else); the reader must keep decoding every older
# folder of its major version, which is what proves that a new server still understands an old edge.
# FACEATTEND_REGEN_GOLDEN=1 writes the folder of a NEW version only: it refuses to touch a folder that exists.

GOLDEN_ROOT = Path(__file__).resolve().parents[1] / "golden"
GOLDEN = GOLDEN_ROOT / SCHEMA_VERSION
GOLDEN_KEY_SEED = hashlib.sha256(b"faceattend golden test key (public, never use in deployment)").digest()
GOLDEN_DECISION = SiteDecision(DecisionRule.ratio(0.84, 0.5), 0.01, 2, 1, 130, "2026-01-02T02:00:00Z")
KINDS = {
    "attendance_event.json": AttendanceEvent,
    "attendance_event_unknown.json": AttendanceEvent,
    "edge_status.json": EdgeStatus,
    "edge_status_offline.json": EdgeStatus,
    "gallery_ack.json": GalleryAck,
    "gallery_manifest.json": GalleryManifest,
    "events_stored.json": EventsStored,
    "unknown_face.json": UnknownFace,
}
# payloads a minor version added: older folders do not have them
SINCE = {"events_stored.json": "1.1", "unknown_face.json": "1.1"}


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def golden_versions() -> list[Path]:
    return sorted(d for d in GOLDEN_ROOT.iterdir() if d.is_dir())


def golden_signer() -> Signer:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Signer(Ed25519PrivateKey.from_private_bytes(GOLDEN_KEY_SEED))


def golden_gallery() -> Gallery:
    emb = (np.arange(3 * 4, dtype=np.float32).reshape(3, 4) - 5.5) / 8  # exact in float32 and float16
    people = (GalleryPerson("p-0001", "Ada Lovelace"), GalleryPerson("p-0002", "Émile Zoë"))
    # epoch 2026-01-01T00:00:00Z in ms (1.1) and the site's rule (1.1); a 1.0 folder's manifest has neither and
    # decodes as epoch 0 under the encoder's default rule
    return Gallery(
        SITE,
        7,
        FP,
        "euclidean",
        "float16",
        emb,
        np.array([0, 1, 1]),
        people,
        epoch=1_767_225_600_000,
        decision=GOLDEN_DECISION,
    )


def golden_payloads() -> dict[str, bytes]:
    manifest, chunks = build_publication(
        golden_gallery(), golden_signer(), chunk_size=32, created="2026-01-02T03:00:00Z"
    )
    ack = GalleryAck(
        device_id="door-1",
        site=SITE,
        version=7,
        status="ok",
        error=None,
        ts="2026-01-02T03:04:06Z",
        epoch=1_767_225_600_000,
    )
    return {
        "attendance_event.json": event().to_json(),
        "attendance_event_unknown.json": event(
            event_id="0b5e7d3a-2f59-4a53-8f0e-7d1c2b3a4f50",
            seq=42,
            person_id=None,
            name=None,
            distance=None,
            margin=None,
            snapshot=None,
        ).to_json(),
        "edge_status.json": status(gallery_epoch=1_767_225_600_000).to_json(),
        "edge_status_offline.json": status(state="offline", gallery_version=None, health={}).to_json(),
        "gallery_ack.json": ack.to_json(),
        "events_stored.json": stored().to_json(),
        "gallery_manifest.json": manifest.to_json(),
        "unknown_face.json": unknown_face().to_json(),
        "gallery_blob.bin": b"".join(chunks),
        "gallery_signing_key.pub": golden_signer().verifier.public_pem().encode(),
    }


def test_the_writers_version_has_its_frozen_goldens_and_reproduces_them():
    expected = golden_payloads()
    if os.environ.get("FACEATTEND_REGEN_GOLDEN") == "1":
        assert not GOLDEN.exists(), f"{GOLDEN} is frozen: bump SCHEMA_VERSION instead of rewriting a released version"
        GOLDEN.mkdir()
        for name, data in expected.items():
            (GOLDEN / name).write_bytes(data)
    assert GOLDEN.is_dir(), f"no goldens for schema version {SCHEMA_VERSION}: FACEATTEND_REGEN_GOLDEN=1 writes them"
    for name, data in expected.items():
        assert (GOLDEN / name).read_bytes() == data, f"{name}: the writer's output changed"
    for name, cls in KINDS.items():
        raw = (GOLDEN / name).read_bytes()
        assert cls.from_json(raw).to_json() == raw, name


@pytest.mark.parametrize("folder", golden_versions(), ids=lambda d: d.name)
def test_every_older_golden_of_this_major_still_decodes(folder: Path):
    assert folder.name.split(".")[0] == SCHEMA_VERSION.split(".")[0]  # a new major gets a new topic root
    for name, cls in KINDS.items():
        if _version(folder.name) < _version(SINCE.get(name, "1.0")):
            assert not (folder / name).exists(), f"{folder.name} predates {name}"
            continue
        decoded = cls.from_json((folder / name).read_bytes())
        # what every version carries still means the same
        assert json.loads((folder / name).read_bytes())["schema"] == cls.SCHEMA and decoded is not None, name
    event = AttendanceEvent.from_json((folder / "attendance_event.json").read_bytes())
    assert event.event_id and event.person_id and event.device_id
    # fields a minor version added read as their defaults from an older folder
    manifest = GalleryManifest.from_json((folder / "gallery_manifest.json").read_bytes())
    ack = GalleryAck.from_json((folder / "gallery_ack.json").read_bytes())
    edge = EdgeStatus.from_json((folder / "edge_status.json").read_bytes())
    if folder.name == "1.0":
        assert (manifest.epoch, ack.epoch, edge.gallery_epoch, manifest.site_decision) == (0, None, None, None)
    else:
        assert manifest.release == (1_767_225_600_000, 7) and ack.epoch == edge.gallery_epoch == manifest.epoch
        assert manifest.site_decision == GOLDEN_DECISION


@pytest.mark.parametrize("folder", golden_versions(), ids=lambda d: d.name)
def test_golden_gallery_verifies_with_the_published_key(folder: Path):
    verifier = Verifier.from_pem_file(folder / "gallery_signing_key.pub")
    manifest = read_manifest((folder / "gallery_manifest.json").read_bytes(), verifier)
    blob = (folder / "gallery_blob.bin").read_bytes()
    asm = GalleryAssembler(verifier, FP, SITE)
    msgs = [(topics.gallery_blob(SITE, i), blob[i * 32 : (i + 1) * 32]) for i in range(manifest.chunk_count)]
    done = feed_all(asm, [*msgs, (topics.gallery_manifest(SITE), (folder / "gallery_manifest.json").read_bytes())])
    assert len(done) == 1 and same(done[0], golden_gallery())
    assert done[0].decision == (None if folder.name == "1.0" else GOLDEN_DECISION)


# ---------------------------------------------------------------- MQTT config (the link itself: tests/integration)


def test_mqtt_config_from_url():
    from models.contract.mqtt_link import MqttConfig

    cfg = MqttConfig.from_url("mqtts://edge%2F1:p%40ss@broker.example:8884", client_id="door-1", ca_file="/ca.pem")
    assert (cfg.host, cfg.port, cfg.tls, cfg.username, cfg.password) == ("broker.example", 8884, True, "edge/1", "p@ss")
    assert cfg.ca_file == "/ca.pem"
    assert "p@ss" not in repr(cfg) and "p@ss" not in cfg.url
    assert MqttConfig.from_url("mqtt://localhost").port == 1883
    assert MqttConfig.from_url("mqtts://localhost").port == 8883


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        ("http://host", {}, "scheme"),
        ("mqtt://", {}, "host"),
        ("mqtt://host:99999", {}, "port"),
        ("mqtt://host/path", {}, "path"),
        ("mqtt://host?x=1", {}, "query"),
        ("mqtt://host", {"clean_session": False}, "client_id"),
        ("mqtt://host", {"client_id": "a/b"}, "client_id"),
        ("mqtt://host", {"ca_file": "/ca.pem"}, "TLS"),
        ("mqtts://host", {"cert_file": "/c.pem"}, "together"),
        ("mqtt://host", {"protocol": "3.1"}, "protocol"),
        ("mqtt://host", {"keepalive": 1}, "keepalive"),
        ("mqtt://host", {"reconnect_min_delay": 5, "reconnect_max_delay": 2}, "reconnect"),
        ("mqtt://host", {"no_such_option": 1}, "no_such_option"),
        ("mqtt://host", {"receive_maximum": 100}, "MQTT 5"),
        ("mqtt://host", {"receive_maximum": 0, "protocol": "5"}, "receive_maximum"),
    ],
)
def test_mqtt_config_errors(url, options, match):
    from models.contract.mqtt_link import MqttConfig

    with pytest.raises(ConfigError, match=match):
        MqttConfig.from_url(url, **options)


@pytest.mark.parametrize(
    "bad", ["", "a/+b", "a/#/b", "a#", "+x", "$share/g", "$share//a", "$share/+/a", "$share/g/a/#/b"]
)
def test_topic_filter_check(bad):
    from models.contract.mqtt_link import check_topic_filter
    from models.errors import MqttError

    with pytest.raises(MqttError):
        check_topic_filter(bad)


def test_topic_filter_check_accepts():
    from models.contract.mqtt_link import check_topic_filter

    for good in (*topics.SERVER_FILTERS, topics.site_gallery_filter("hq"), "#", "+", "a/+/b/#", "$share/g/a/+/b"):
        assert check_topic_filter(good) == good


def test_shared_filters_match_the_topics_of_their_filter():
    import paho.mqtt.client as mqtt

    from models.contract.mqtt_link import matched_filter, shared_filter

    shared = shared_filter("ingest", topics.ALL_EDGE_EVENTS)
    assert shared == f"$share/ingest/{topics.ALL_EDGE_EVENTS}"
    assert matched_filter(shared) == topics.ALL_EDGE_EVENTS and matched_filter(topics.ALL_EDGE_EVENTS) == shared[14:]
    assert mqtt.topic_matches_sub(matched_filter(shared), topics.edge_events("door-1"))
