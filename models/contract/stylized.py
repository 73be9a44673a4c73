"""The follow-up an edge publishes (QoS 1, not retained) on `faceattend/v1/edge/{device}/stylized` when its offline
style worker has painted an attendance event's snapshot in one style.

It refers to the attendance event by `event_id` and to both images by reference, never by bytes: `snapshot` is
the event's own `snapshot` reference, `stylized` the stylised image's (the same kind of reference, relative to the
same snapshot store: `<YYYY-MM-DD>/<event_id>.<style>.jpg` on an edge agent). One message per (event, style);
QoS 1 is at-least-once, so a consumer de-duplicates on (`event_id`, `style`).

`model` names the style network that painted it (`<sha256 prefix of the ONNX file>`, 16 hex digits on an edge
agent: enough to tell two models apart and to find the file), `ms` the time stylisation took, `ts` when it
finished (UTC). Style names are `[A-Za-z0-9][A-Za-z0-9_-]{0,31}` (no dot, no slash: they become part of a file
name).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import ClassVar

from models.contract import limits
from models.contract.codec import Message, check_id, check_min, check_text, normalise_ts

SCHEMA = "faceattend.stylized_snapshot"

MAX_BYTES = limits.MAX_EVENT_BYTES  # a few hundred bytes in practice, bounded like an attendance event
MAX_STYLE_CHARS = 32
MAX_MODEL_CHARS = 128
STYLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def valid_style_name(name: object) -> bool:
    return isinstance(name, str) and STYLE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class StylizedSnapshot(Message):
    SCHEMA: ClassVar[str] = SCHEMA
    MAX_BYTES: ClassVar[int] = MAX_BYTES

    event_id: str
    device_id: str
    site: str
    style: str
    snapshot: str
    stylized: str
    model: str
    ms: float
    ts: str

    def validate(self) -> None:
        try:
            self.replace_field("event_id", str(uuid.UUID(self.event_id)))
        except ValueError:
            raise self.invalid("event_id", f"{self.event_id!r} is not a UUID") from None
        check_id(self, "device_id")
        check_id(self, "site")
        if not valid_style_name(self.style):
            raise self.invalid("style", f"{self.style!r} is not a style name ({STYLE_NAME.pattern})")
        check_text(self, "snapshot", limits.MAX_SNAPSHOT_CHARS)
        check_text(self, "stylized", limits.MAX_SNAPSHOT_CHARS)
        if self.stylized == self.snapshot:
            raise self.invalid("stylized", "must differ from 'snapshot' (the original is never overwritten)")
        check_text(self, "model", MAX_MODEL_CHARS)
        check_min(self, "ms", 0)
        normalise_ts(self, "ts")
