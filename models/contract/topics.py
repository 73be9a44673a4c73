"""MQTT topic names of the contract, subscription filters, and topic parsing.

The root carries the major version (`faceattend/v1`): a breaking change moves to `v2` topics so that old and new
readers can run side by side. Layout:

    faceattend/v1/site/{site}/gallery/manifest      server -> edges, retained
    faceattend/v1/site/{site}/gallery/blob/{i}      server -> edges, retained, i = 0 .. chunk_count-1
    faceattend/v1/edge/{device}/status              edge -> all, retained (the last will says offline)
    faceattend/v1/edge/{device}/events              edge -> consumers, not retained
    faceattend/v1/edge/{device}/stylized            edge -> consumers, not retained (a snapshot painted offline)
    faceattend/v1/edge/{device}/gallery/ack         edge -> server
    faceattend/v1/edge/{device}/unknown             edge -> server only, not retained (an unknown visitor's face
                                                    crop and embedding; sent only where the site opted in)
    faceattend/v1/device/{device}/stored            server -> that edge, not retained (since 1.1: the events the
                                                    server has stored; the edge forgets an event only then)

The branch says the direction: `edge/{device}/` is what a device writes, `site/` and `device/{device}/` what the
server writes to edges, so that a broker ACL can give each side exactly its own (deploy/mosquitto/acl).

Site and device ids are `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`: never empty, never a wildcard (`+`, `#`) or a level
separator (`/`), so an id can neither widen a subscription nor move a message to another topic.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from models.contract.limits import MAX_CHUNK_COUNT
from models.errors import TopicError

ROOT = "faceattend/v1"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")  # decimal, no sign, no leading zeros: one spelling per chunk


class TopicKind(str, enum.Enum):
    GALLERY_MANIFEST = "gallery_manifest"
    GALLERY_BLOB = "gallery_blob"
    EDGE_STATUS = "edge_status"
    EDGE_EVENTS = "edge_events"
    GALLERY_ACK = "gallery_ack"
    EDGE_STYLIZED = "edge_stylized"
    EVENTS_STORED = "events_stored"
    EDGE_UNKNOWN = "edge_unknown"


@dataclass(frozen=True)
class ParsedTopic:
    kind: TopicKind
    site: str | None = None  # set for the gallery topics
    device: str | None = None  # set for the edge topics
    index: int | None = None  # set for gallery blob chunks


def validate_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid site / device id, else raise TopicError naming `what`."""
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, got {type(value).__name__}")
    if not _ID.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} is not a valid id: 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
        )
    return value


def _chunk_index(i: object) -> int:
    # bool is an int in Python; a True chunk index is a caller's bug, not chunk 1
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_CHUNK_COUNT:
        raise TopicError(f"chunk index must be an integer in [0, {MAX_CHUNK_COUNT}), got {i!r}")
    return i


def gallery_manifest(site: str) -> str:
    return f"{ROOT}/site/{validate_id(site, 'site')}/gallery/manifest"


def gallery_blob(site: str, i: int) -> str:
    return f"{ROOT}/site/{validate_id(site, 'site')}/gallery/blob/{_chunk_index(i)}"


def edge_status(device: str) -> str:
    return f"{ROOT}/edge/{validate_id(device, 'device')}/status"


def edge_events(device: str) -> str:
    return f"{ROOT}/edge/{validate_id(device, 'device')}/events"


def gallery_ack(device: str) -> str:
    return f"{ROOT}/edge/{validate_id(device, 'device')}/gallery/ack"


def edge_stylized(device: str) -> str:
    return f"{ROOT}/edge/{validate_id(device, 'device')}/stylized"


def events_stored(device: str) -> str:
    return f"{ROOT}/device/{validate_id(device, 'device')}/stored"


def edge_unknown(device: str) -> str:
    return f"{ROOT}/edge/{validate_id(device, 'device')}/unknown"


# Subscription filters.
ALL_EDGE_EVENTS = f"{ROOT}/edge/+/events"
ALL_EDGE_STATUS = f"{ROOT}/edge/+/status"
ALL_GALLERY_ACKS = f"{ROOT}/edge/+/gallery/ack"
SERVER_FILTERS = (ALL_EDGE_EVENTS, ALL_EDGE_STATUS, ALL_GALLERY_ACKS)
# not among the server's: stylised snapshots are for whoever shows them (a lobby screen, a gallery page)
ALL_EDGE_STYLIZED = f"{ROOT}/edge/+/stylized"
# what the server publishes confirmations on (its broker ACL grants exactly this)
ALL_EVENTS_STORED = f"{ROOT}/device/+/stored"
# the server's alone (its visitor ingest): faces of people nobody enrolled are never given to consumers
ALL_EDGE_UNKNOWN = f"{ROOT}/edge/+/unknown"


def site_gallery_filter(site: str) -> str:
    """A site's manifest and every chunk (retained, so delivered on subscribe): what the device ACL grants."""
    return f"{ROOT}/site/{validate_id(site, 'site')}/gallery/#"


def site_gallery_chunks(site: str) -> str:
    """Every chunk of a site's gallery. An edge holds it only while it assembles a manifest: subscribing makes the
    broker send the retained chunks, which is how it fetches a publication (edge_agent.gallery.sync)."""
    return f"{ROOT}/site/{validate_id(site, 'site')}/gallery/blob/+"


def parse_topic(topic: str) -> ParsedTopic:
    """Classify a contract topic; raise TopicError for anything else (other root, bad id, unknown suffix)."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {ROOT!r}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) >= 3 and parts[0] == "site" and parts[2] == "gallery":
        site = validate_id(parts[1], "site")
        rest = parts[3:]
        if rest == ["manifest"]:
            return ParsedTopic(TopicKind.GALLERY_MANIFEST, site=site)
        if len(rest) == 2 and rest[0] == "blob" and _INDEX.fullmatch(rest[1]):
            index = int(rest[1])
            if index < MAX_CHUNK_COUNT:
                return ParsedTopic(TopicKind.GALLERY_BLOB, site=site, index=index)
    elif len(parts) >= 3 and parts[0] == "edge":
        device = validate_id(parts[1], "device")
        rest = parts[2:]
        if rest == ["status"]:
            return ParsedTopic(TopicKind.EDGE_STATUS, device=device)
        if rest == ["events"]:
            return ParsedTopic(TopicKind.EDGE_EVENTS, device=device)
        if rest == ["gallery", "ack"]:
            return ParsedTopic(TopicKind.GALLERY_ACK, device=device)
        if rest == ["stylized"]:
            return ParsedTopic(TopicKind.EDGE_STYLIZED, device=device)
        if rest == ["unknown"]:
            return ParsedTopic(TopicKind.EDGE_UNKNOWN, device=device)
    elif len(parts) == 3 and parts[0] == "device" and parts[2] == "stored":
        return ParsedTopic(TopicKind.EVENTS_STORED, device=validate_id(parts[1], "device"))
    raise TopicError(f"topic {topic!r} is not a faceattend contract topic")
