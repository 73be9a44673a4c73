"""The unknown visitors' faces the edges send (`faceattend/v1/edge/+/unknown`, models.contract.unknown_face) into the
store, for the sites that opted in (`unknown_visitors.sites`).

Its own MQTT link, with a clean session, created only when some site opted in: no subscription exists (and so the
broker routes no face to the server, nor queues any in a persistent session) while the feature is off, and the
attendance ingest's persistent session is never held up by a face being written. Faces are best effort by design
(edge_agent/delivery/unknown_faces.py): what an edge sends while the server is down is lost, and a visitor who
comes back is sent again.

Each message is handled on the link's network thread, synchronously (a few a minute at most): size, envelope and
fields (the contract codec), the topic's device against the payload's, the site opted in, the encoder fingerprint
the server's own (faces of another encoder cannot be compared with its templates), the JPEG decodable; then it is
stored (a redelivered `face_id` once) and the retention limits applied. A refusal is logged with its reason and
counted, never stored; the process carries on.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import numpy as np

from enrollment_server.store import Store, UnknownFace
from enrollment_server.visitors import Visitors
from models.contract import timestamps, topics
from models.contract.mqtt_link import InboundMessage, MqttLink
from models.contract.unknown_face import UnknownFace as WireFace
from models.errors import ImageError, PayloadError, StoreError, TopicError
from models.imageio import ImageLimits, load_image

log = logging.getLogger(__name__)

PURGE_EVERY_S = 600.0
# a crop is at most 160 KiB of JPEG (models.contract.limits); its pixels are bounded as well before decoding
CROP_LIMITS = ImageLimits(max_bytes=256 * 1024, max_pixels=1024 * 1024, max_side=1024)
LOG_ALL_UP_TO = 50  # rejections logged per reason before they are only counted (one line per 500 after that)


@dataclass(frozen=True)
class VisitorIngestStats:
    received: int
    stored: int
    duplicates: int
    rejected: MappingProxyType[str, int]
    purged: int


class VisitorIngest:
    def __init__(self, store: Store, link: MqttLink, visitors: Visitors) -> None:
        self._store = store
        self._link = link
        self._visitors = visitors
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._purge_loop, name="faceattend-visitor-purge", daemon=True)

    def start(self) -> None:
        """Subscribe (the link remembers it across reconnects) and start the retention timer."""
        self._link.subscribe(topics.ALL_EDGE_UNKNOWN, 1, self.handle)
        self._timer.start()
        log.info(
            "unknown visitors: accepted for site(s) %s, kept %g days / %d faces per site",
            ", ".join(self._visitors.config.sites),
            self._visitors.config.max_age_days,
            self._visitors.config.max_faces,
        )

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._link.wait_subscribed(topics.ALL_EDGE_UNKNOWN, timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join(5.0)

    def stats(self) -> VisitorIngestStats:
        with self._lock:
            c = self._counts
            return VisitorIngestStats(
                c["received"], c["stored"], c["duplicates"], MappingProxyType(dict(self._rejected)), c["purged"]
            )

    def health(self) -> dict[str, Any]:
        s = self.stats()
        return {
            "received": s.received,
            "stored": s.stored,
            "duplicates": s.duplicates,
            "rejected": dict(s.rejected),
            "purged": s.purged,
        }

    # ---- the network thread ----

    def handle(self, msg: InboundMessage) -> None:
        with self._lock:
            self._counts["received"] += 1
        try:
            face, crop = self._check(msg)
        except _Refused as refused:
            self._reject(msg.topic, refused.reason, str(refused))
            return
        try:
            new = self._store.add_unknown_face(face, crop, received_at=datetime.now(timezone.utc))
            purged = self._visitors.purge() if new else 0
        except StoreError as exc:
            self._reject(msg.topic, "store_failed", str(exc))
            return
        with self._lock:
            self._counts["stored" if new else "duplicates"] += 1
            self._counts["purged"] += purged
        log.debug("unknown face %s of %s/%s stored", face.face_id, face.device_id, face.camera)

    def _check(self, msg: InboundMessage) -> tuple[UnknownFace, bytes]:
        try:
            device = topics.parse_topic(msg.topic).device
        except TopicError as exc:
            raise _Refused("bad_topic", str(exc)) from None
        try:
            wire = WireFace.from_json(msg.payload)
        except PayloadError as exc:
            raise _Refused("invalid", str(exc)) from None
        if wire.device_id != device:
            raise _Refused("device_mismatch", f"payload device_id {wire.device_id!r} published on device {device!r}")
        if not self._visitors.enabled(wire.site):
            raise _Refused("site_not_opted_in", f"site {wire.site!r} is not in unknown_visitors.sites: not stored")
        if wire.fingerprint != self._visitors.fingerprint:
            raise _Refused(
                "foreign_encoder", f"encoder {wire.fingerprint!r}, the server's is {self._visitors.fingerprint!r}"
            )
        crop = wire.jpeg_bytes()
        try:
            load_image(crop, CROP_LIMITS)
        except ImageError as exc:
            raise _Refused("bad_crop", str(exc)) from None
        face = UnknownFace(
            face_id=wire.face_id,
            site_id=wire.site,
            device_id=wire.device_id,
            camera=wire.camera,
            track_id=wire.track_id,
            ts=timestamps.parse_utc(wire.ts),
            embedding=np.asarray(wire.embedding, dtype=np.float32),
            fingerprint=wire.fingerprint,
            gallery_version=wire.gallery_version,
            distance=wire.distance,
            quality=wire.quality,
        )
        return face, crop

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        with self._lock:
            self._rejected[reason] += 1
            n = self._rejected[reason]
        if n <= LOG_ALL_UP_TO or n % 500 == 0:
            log.warning("unknown visitors: rejected message on %s: %s: %s (%d so far)", topic, reason, detail, n)

    # ---- retention timer ----

    def _purge_loop(self) -> None:
        while True:
            try:
                purged = self._visitors.purge()
            except StoreError as exc:
                log.warning("unknown visitors: retention purge failed (retried later): %s", exc)
                purged = 0
            with self._lock:
                self._counts["purged"] += purged
            if self._stop.wait(PURGE_EVERY_S):
                return


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
