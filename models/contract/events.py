"""The attendance event an edge publishes (QoS 1, not retained) on `faceattend/v1/edge/{device}/events`, and the
server's confirmation that it stored events (QoS 1, not retained) on `faceattend/v1/device/{device}/stored`.

QoS 1 is at-least-once: a consumer de-duplicates on `event_id` (a UUID, normalised to lower-case canonical form so
two spellings of one id cannot be stored twice). `seq` is a per-device counter that lets a consumer notice gaps.
`person_id` null means an unknown face; `distance` / `margin` may be null when there was nothing to compare with
(empty gallery). `snapshot` is a reference (path, key or URL) to a stored image, never the image bytes.

`EventsStored` (since schema 1.1) lists event ids the server has committed to its database, new or already there:
the edge forgets an event only when one names it (edge_agent/delivery/event_publisher.py), so a broker that loses
its queue, drops messages over its limit or crashes cannot lose an event the edge still holds. Ids, not a
high-water `seq`: seqs restart at 0 when a door is re-installed with a new outbox, and a mark carried over from the
old one would make the new door forget events the server never saw. A lost confirmation costs one re-publication,
which the server answers with another confirmation (duplicates are confirmed too).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import ClassVar

from models.contract import limits, timestamps
from models.contract.codec import Message, check_id, check_min, check_text, normalise_ts

SCHEMA = "faceattend.attendance_event"
STORED_SCHEMA = "faceattend.events_stored"


@dataclass(frozen=True)
class AttendanceEvent(Message):
    SCHEMA: ClassVar[str] = SCHEMA
    MAX_BYTES: ClassVar[int] = limits.MAX_EVENT_BYTES

    event_id: str
    seq: int
    device_id: str
    site: str
    camera: str
    track_id: int
    person_id: str | None
    name: str | None
    distance: float | None
    margin: float | None
    threshold: float
    gallery_version: int
    fingerprint: str
    ts: str
    snapshot: str | None = None

    def validate(self) -> None:
        try:
            self.replace_field("event_id", canonical_event_id(self.event_id))
        except ValueError:
            raise self.invalid("event_id", f"{self.event_id!r} is not a UUID") from None
        check_min(self, "seq", 0)
        check_id(self, "device_id")
        check_id(self, "site")
        check_text(self, "camera", limits.MAX_CAMERA_CHARS)
        check_min(self, "track_id", 0)
        check_text(self, "person_id", limits.MAX_PERSON_ID_CHARS)
        check_text(self, "name", limits.MAX_NAME_CHARS, allow_empty=True)
        check_min(self, "distance", 0)
        check_min(self, "gallery_version", 0)
        check_text(self, "fingerprint", limits.MAX_FINGERPRINT_CHARS)
        normalise_ts(self, "ts")
        check_text(self, "snapshot", limits.MAX_SNAPSHOT_CHARS)


def canonical_event_id(value: str) -> str:
    """The one spelling of an event id (lower-case canonical UUID); ValueError when it is not a UUID."""
    return str(uuid.UUID(value))


@dataclass(frozen=True)
class EventsStored(Message):
    """Events of `device_id` the server has stored (committed), each id once, at most `MAX_STORED_IDS`."""

    SCHEMA: ClassVar[str] = STORED_SCHEMA
    MAX_BYTES: ClassVar[int] = limits.MAX_STORED_BYTES

    device_id: str
    event_ids: tuple[str, ...]
    ts: str

    def validate(self) -> None:
        check_id(self, "device_id")
        if not self.event_ids:
            raise self.invalid("event_ids", "must not be empty")
        if len(self.event_ids) > limits.MAX_STORED_IDS:
            raise self.invalid("event_ids", f"holds {len(self.event_ids)} ids; the limit is {limits.MAX_STORED_IDS}")
        try:
            ids = tuple(canonical_event_id(e) for e in self.event_ids)
        except ValueError:
            raise self.invalid("event_ids", "holds an id that is not a UUID") from None
        if len(set(ids)) != len(ids):
            raise self.invalid("event_ids", "holds an id twice")
        self.replace_field("event_ids", ids)
        normalise_ts(self, "ts")


def new_event(
    *,
    seq: int,
    device_id: str,
    site: str,
    camera: str,
    track_id: int,
    person_id: str | None,
    name: str | None,
    distance: float | None,
    margin: float | None,
    threshold: float,
    gallery_version: int,
    fingerprint: str,
    snapshot: str | None = None,
    ts: str | None = None,
    event_id: str | None = None,
) -> AttendanceEvent:
    """A fresh event: unless given, a random (uuid4) event_id and the current UTC time. The edge draws the id
    first when a snapshot named after it is stored before the event."""
    return AttendanceEvent(
        event_id=event_id if event_id is not None else str(uuid.uuid4()),
        seq=seq,
        device_id=device_id,
        site=site,
        camera=camera,
        track_id=track_id,
        person_id=person_id,
        name=name,
        distance=distance,
        margin=margin,
        threshold=threshold,
        gallery_version=gallery_version,
        fingerprint=fingerprint,
        ts=ts if ts is not None else timestamps.utc_now(),
        snapshot=snapshot,
    )
