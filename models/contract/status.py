"""Edge status (retained, `faceattend/v1/edge/{device}/status`) and gallery acknowledgement payloads.

An edge publishes `online` when connected, `stopped` before a clean shutdown, and registers `offline` as its last
will: the broker publishes it when the connection dies without a DISCONNECT. The will payload is encoded when the
client connects, so an `offline` status's `ts` is the time the will was registered, not the time of the loss; a
consumer that needs the latter uses its own receive time.

`health` is a small tree of figures (numbers, strings, booleans, nested objects up to three levels, at most 256
entries in all): enough for fps, queue depths, temperatures and error counts, never a log dump.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from models.contract import limits
from models.contract.codec import Message, check_choice, check_id, check_min, check_text, normalise_ts

STATUS_SCHEMA = "faceattend.edge_status"
ACK_SCHEMA = "faceattend.gallery_ack"

STATES = ("online", "stopped", "offline")
ACK_STATUSES = ("ok", "error")


@dataclass(frozen=True)
class EdgeStatus(Message):
    SCHEMA: ClassVar[str] = STATUS_SCHEMA
    MAX_BYTES: ClassVar[int] = limits.MAX_STATUS_BYTES

    state: str
    device_id: str
    site: str
    agent_version: str
    gallery_version: int | None  # None: no gallery loaded yet
    fingerprint: str
    ts: str
    health: dict = field(default_factory=dict)
    gallery_epoch: int | None = None  # 1.1: the epoch of gallery_version (None: no gallery, or a 1.0 edge)

    def validate(self) -> None:
        check_choice(self, "state", STATES)
        check_id(self, "device_id")
        check_id(self, "site")
        check_text(self, "agent_version", limits.MAX_VERSION_CHARS)
        check_min(self, "gallery_version", 0)
        check_min(self, "gallery_epoch", 0)
        check_text(self, "fingerprint", limits.MAX_FINGERPRINT_CHARS)
        normalise_ts(self, "ts")
        counter = [0]
        self.replace_field("health", _frozen_health(self, self.health, "health", 1, counter))


def _frozen_health(msg: Message, tree: Mapping[str, Any], where: str, depth: int, counter: list[int]) -> Mapping:
    # returns a read-only copy so that the frozen status cannot be changed through a shared dict
    if depth > limits.MAX_HEALTH_DEPTH:
        raise msg.invalid(where, f"nests deeper than {limits.MAX_HEALTH_DEPTH} levels")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        counter[0] += 1
        if counter[0] > limits.MAX_HEALTH_ENTRIES:
            raise msg.invalid("health", f"has more than {limits.MAX_HEALTH_ENTRIES} entries")
        if not isinstance(key, str) or not key or len(key) > limits.MAX_HEALTH_KEY_CHARS:
            raise msg.invalid(where, f"key {key!r} must be a string of 1-{limits.MAX_HEALTH_KEY_CHARS} characters")
        path = f"{where}.{key}"
        if isinstance(value, Mapping):
            out[key] = _frozen_health(msg, value, path, depth + 1, counter)
        elif isinstance(value, bool):
            out[key] = value
        elif isinstance(value, (int, float)):
            if not math.isfinite(value) or abs(value) >= 2**63:
                raise msg.invalid(path, "must be a finite number within the 64-bit range")
            out[key] = value
        elif isinstance(value, str):
            if len(value) > limits.MAX_HEALTH_STR_CHARS:
                raise msg.invalid(path, f"is longer than {limits.MAX_HEALTH_STR_CHARS} characters")
            out[key] = value
        else:
            raise msg.invalid(path, f"must be a number, string, boolean or object, got {type(value).__name__}")
    return MappingProxyType(out)


@dataclass(frozen=True)
class GalleryAck(Message):
    """An edge's answer to a gallery version: applied (`ok`) or refused / failed (`error`, with the reason)."""

    SCHEMA: ClassVar[str] = ACK_SCHEMA
    MAX_BYTES: ClassVar[int] = limits.MAX_ACK_BYTES

    device_id: str
    site: str
    version: int
    status: str
    error: str | None
    ts: str
    epoch: int | None = None  # 1.1: the epoch of `version` (None from a 1.0 edge, or a manifest too broken to tell)

    def validate(self) -> None:
        check_id(self, "device_id")
        check_id(self, "site")
        check_min(self, "version", 1)
        check_min(self, "epoch", 0)
        check_choice(self, "status", ACK_STATUSES)
        if self.status == "ok" and self.error is not None:
            raise self.invalid("error", "must be null when status is 'ok'")
        if self.status == "error" and not self.error:
            raise self.invalid("error", "must say why when status is 'error'")
        check_text(self, "error", limits.MAX_ERROR_CHARS)
        normalise_ts(self, "ts")
