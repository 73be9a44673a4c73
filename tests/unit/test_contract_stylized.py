"""The stylised-snapshot follow-up message (models/contract/stylized.py) and its topic: round trip, the golden
payload, field checks, and parse_topic agreeing with the builder. No broker here."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from models.contract import topics
from models.contract.codec import SCHEMA_VERSION
from models.contract.events import AttendanceEvent
from models.contract.stylized import MAX_BYTES, SCHEMA, StylizedSnapshot, valid_style_name
from models.errors import PayloadError, SchemaVersionError, TopicError

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / SCHEMA_VERSION / "stylized_snapshot.json"
EVENT_ID = "6f1c1f8e-64c4-4b6e-9a57-1f0e2b7d4c11"  # the golden attendance event's


def message(**over) -> StylizedSnapshot:
    fields = dict(
        event_id=EVENT_ID,
        device_id="door-1",
        site="hq",
        style="mosaic",
        snapshot="2026-01-02/6f1c1f8e-64c4-4b6e-9a57-1f0e2b7d4c11.jpg",
        stylized="2026-01-02/6f1c1f8e-64c4-4b6e-9a57-1f0e2b7d4c11.mosaic.jpg",
        model="0123456789abcdef",
        ms=312.5,
        ts="2026-01-02T03:05:00.000000Z",
    )
    fields.update(over)
    return StylizedSnapshot(**fields)


# ---------------------------------------------------------------- topic


def test_topic_builder_parse_and_filter():
    topic = topics.edge_stylized("door-1")
    assert topic == "faceattend/v1/edge/door-1/stylized"
    assert topics.parse_topic(topic) == topics.ParsedTopic(topics.TopicKind.EDGE_STYLIZED, device="door-1")
    assert topics.TopicKind("edge_stylized") is topics.TopicKind.EDGE_STYLIZED
    assert mqtt.topic_matches_sub(topics.ALL_EDGE_STYLIZED, topic)
    assert not mqtt.topic_matches_sub(topics.ALL_EDGE_EVENTS, topic)
    # a consumer of attendance events is not handed stylised snapshots (the server does not subscribe to them)
    assert topics.ALL_EDGE_STYLIZED not in topics.SERVER_FILTERS


@pytest.mark.parametrize(
    "topic",
    [
        "faceattend/v1/edge/door-1/stylized/x",
        "faceattend/v1/edge/door-1/stylised",
        "faceattend/v1/edge/+/stylized",
        "faceattend/v2/edge/door-1/stylized",
        "faceattend/v1/site/hq/stylized",
    ],
)
def test_parse_topic_refuses_near_misses(topic):
    with pytest.raises(TopicError):
        topics.parse_topic(topic)


@pytest.mark.parametrize("bad", ["", "+", "#", "a/b", None])
def test_topic_refuses_bad_device(bad):
    with pytest.raises(TopicError):
        topics.edge_stylized(bad)


# ---------------------------------------------------------------- payload


def test_round_trip_and_envelope():
    msg = message()
    raw = msg.to_json()
    obj = json.loads(raw)
    assert obj["schema"] == SCHEMA == "faceattend.stylized_snapshot" and obj["schema_version"] == SCHEMA_VERSION
    assert set(obj) == {f.name for f in dataclasses.fields(StylizedSnapshot)} | {"schema", "schema_version"}
    assert StylizedSnapshot.from_json(raw) == msg
    assert len(raw) < 1024  # references, never image bytes


def test_golden_payload():
    expected = message().to_json()
    if os.environ.get("FACEATTEND_REGEN_GOLDEN") == "1" and not GOLDEN.exists():  # a released version is frozen
        GOLDEN.write_bytes(expected)
    raw = GOLDEN.read_bytes()
    assert raw == expected, "the stylized_snapshot writer's output changed: bump the schema version"
    decoded = StylizedSnapshot.from_json(raw)
    assert decoded.to_json() == raw
    # it refers to the golden attendance event by its id and to the event's own snapshot reference's day
    event = AttendanceEvent.from_json((GOLDEN.parent / "attendance_event.json").read_bytes())
    assert decoded.event_id == event.event_id and decoded.device_id == event.device_id and decoded.site == event.site


def test_normalisation_and_minor_versions():
    msg = message(event_id=EVENT_ID.upper(), ts="2026-01-02T03:05:00+00:00", ms=300)
    assert msg.event_id == EVENT_ID and msg.ts == "2026-01-02T03:05:00.000000Z" and msg.ms == 300.0
    obj = json.loads(message().to_json()) | {"schema_version": "1.7", "width": 640}
    assert StylizedSnapshot.from_json(json.dumps(obj).encode()) == message()


def test_other_major_and_schema_are_refused():
    obj = json.loads(message().to_json())
    with pytest.raises(SchemaVersionError):
        StylizedSnapshot.from_json(json.dumps(obj | {"schema_version": "2.0"}).encode())
    with pytest.raises(PayloadError, match="'schema'"):
        StylizedSnapshot.from_json(json.dumps(obj | {"schema": "faceattend.attendance_event"}).encode())
    with pytest.raises(PayloadError, match="schema"):
        AttendanceEvent.from_json(message().to_json())


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(StylizedSnapshot)])
def test_every_field_is_required(name):
    obj = json.loads(message().to_json())
    del obj[name]
    with pytest.raises(PayloadError, match=f"missing required field '{name}'"):
        StylizedSnapshot.from_json(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("event_id", "not-a-uuid", "event_id"),
        ("device_id", "door/1", "device_id"),
        ("site", "", "site"),
        ("style", "mo.saic", "style"),
        ("style", "a/b", "style"),
        ("style", "x" * 33, "style"),
        ("style", "", "style"),
        ("snapshot", "", "snapshot"),
        ("snapshot", "x" * 513, "snapshot"),
        ("stylized", "2026-01-02/6f1c1f8e-64c4-4b6e-9a57-1f0e2b7d4c11.jpg", "stylized"),
        ("model", "", "model"),
        ("ms", -1.0, "ms"),
        ("ms", "fast", "ms"),
        ("ts", "2026-01-02T03:05:00+01:00", "ts"),
        ("ts", 5, "ts"),
    ],
)
def test_bad_fields_are_named(field, value, match):
    with pytest.raises(PayloadError, match=match):
        message(**{field: value})


def test_oversized_payload_refused_before_parsing():
    with pytest.raises(PayloadError, match="exceeds"):
        StylizedSnapshot.from_json(b" " * (MAX_BYTES + 1))


def test_style_names():
    assert valid_style_name("mosaic") and valid_style_name("starry_night-2") and valid_style_name("A" * 32)
    for bad in ("", "-x", "x.y", "x y", "é", "A" * 33, None, 3):
        assert not valid_style_name(bad)
