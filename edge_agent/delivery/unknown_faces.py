"""Unknown visitors' faces to the enrollment server (`faceattend/v1/edge/{device}/unknown`, QoS 1), so that the admin
can name, in one click, the people the doors keep seeing whom nobody enrolled.

Privacy: a face image of somebody who never agreed to be enrolled leaves the door only when the site chose so.
`unknown_faces.share` is off by default; off, the agent does not even build a sharer and nothing is published (the
topic stays silent: tests/integration/test_agent_e2e.py checks it). The server stores what it receives only for
sites its own configuration lists, and deletes faces past its retention limits (enrollment_server/visitors.py).

What is sent, per track decided unknown: the track's best sample (the highest quality weight) as a JPEG crop of the
face with some context (`face_margin`, at most `crop_px` on its longest side: the server re-detects and re-encodes
it before it becomes a template, so it needs the whole head), that sample's embedding (the server groups visitors by
it), its quality weight, and the decision's distance and gallery version.

Delivery is best effort, unlike attendance: a face is published when the link is connected and dropped (counted,
logged at debug) when it is not; no outbox, because an unknown visitor who comes back is sent again and a backlog
of faces is not worth disk on the door. `max_per_hour` bounds what a crowd can make the door send.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.delivery.snapshots import face_crop
from edge_agent.recognition.recognizer import TrackDecision
from models.contract import limits, topics
from models.contract.mqtt_link import MqttLink, PublishHandle
from models.contract.timestamps import format_utc
from models.contract.unknown_face import UnknownFace, encode_crop
from models.errors import ConfigError, ContractError, ImageError, MqttError
from models.imageio import encode_jpeg

log = logging.getLogger(__name__)

_HOUR_S = 3600.0


@dataclass(frozen=True, kw_only=True)
class UnknownFacesConfig:
    # Privacy choice of the site: false (the default) sends no face of an unknown visitor anywhere.
    share: bool = False
    # the crop's longest side at most (never upscaled): 320 leaves a frontal face about 40 px between the eyes, clear
    # of the enrollment gate's 28 px minimum once the server re-detects it
    crop_px: int = 320
    face_margin: float = 0.5  # context around the face box, in box sizes on every side (the server re-detects)
    jpeg_quality: int = 85
    max_per_hour: int = 120

    def __post_init__(self) -> None:
        if not isinstance(self.share, bool):
            raise ConfigError(f"unknown_faces.share: expected true or false, got {self.share!r}")
        for key, low, high in (("crop_px", 64, 1024), ("jpeg_quality", 30, 100), ("max_per_hour", 1, 100_000)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"unknown_faces.{key}: must be an integer in [{low}, {high}], got {value!r}")
        margin = self.face_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0 <= margin <= 2):
            raise ConfigError(f"unknown_faces.face_margin: must be a number in [0, 2], got {margin!r}")


@dataclass(frozen=True)
class SharerStats:
    sent: int  # handed to the link while connected
    acknowledged: int  # of those, PUBACKed by the broker
    dropped_offline: int
    dropped_rate: int  # over max_per_hour
    failed: int  # unusable frame or box, a crop over the contract's limit, a refused publish


class UnknownFaceSharer:
    """`offer(decision)` for every decision (known ones are ignored); thread-safe, never raises."""

    def __init__(self, config: UnknownFacesConfig, link: MqttLink, device_id: str, site: str) -> None:
        if not config.share:
            raise ConfigError("unknown_faces.share is off: an agent that does not share builds no sharer")
        self._config = config
        self._link = link
        self._device = device_id
        self._site = site
        self._topic = topics.edge_unknown(device_id)
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()  # monotonic times of the faces sent in the last hour
        self._handles: list[PublishHandle] = []
        self._sent = self._acked = self._offline = self._rate = self._failed = 0

    def offer(self, d: TrackDecision) -> bool:
        """Publish the face of an unknown decision; True when it was handed to the link."""
        if d.known:
            return False
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0] >= _HOUR_S:
                self._recent.popleft()
            if len(self._recent) >= self._config.max_per_hour:
                self._rate += 1
                return False
        if not self._link.is_connected():
            with self._lock:
                self._offline += 1
            log.debug("unknown face of %s track %d not sent: broker not connected", d.camera, d.track_id)
            return False
        try:
            payload = self._message(d).to_json()
            handle = self._link.publish(self._topic, payload, qos=1)
        except (ImageError, ContractError, MqttError) as exc:
            with self._lock:
                self._failed += 1
            log.warning("unknown face of %s track %d not sent: %s", d.camera, d.track_id, exc)
            return False
        with self._lock:
            self._recent.append(now)
            self._sent += 1
            self._handles.append(handle)
            self._settle_handles()
        log.info("unknown face of %s track %d sent (%d bytes)", d.camera, d.track_id, len(payload))
        return True

    def _message(self, d: TrackDecision) -> UnknownFace:
        return UnknownFace(
            face_id=str(uuid.uuid4()),
            device_id=self._device,
            site=self._site,
            camera=d.camera,
            track_id=d.track_id,
            ts=format_utc(d.decided_wall),
            fingerprint=d.fingerprint,
            gallery_version=d.gallery_version,
            distance=d.distance,
            quality=min(1.0, max(1e-3, float(d.quality))),
            embedding=tuple(float(v) for v in np.asarray(d.embedding, dtype=np.float32)),
            crop_jpeg=encode_crop(self._crop_jpeg(d)),
        )

    def _crop_jpeg(self, d: TrackDecision) -> bytes:
        crop = face_crop(d.frame, d.bbox, self._config.face_margin)
        longest = max(crop.shape[:2])
        if longest > self._config.crop_px:
            scale = self._config.crop_px / longest
            size = (max(1, math.floor(crop.shape[1] * scale)), max(1, math.floor(crop.shape[0] * scale)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        data = encode_jpeg(np.ascontiguousarray(crop), self._config.jpeg_quality)
        if len(data) > limits.MAX_UNKNOWN_CROP_BYTES:
            raise ImageError(f"the face crop is {len(data)} bytes, over {limits.MAX_UNKNOWN_CROP_BYTES}")
        return data

    def _settle_handles(self) -> None:
        # caller holds the lock; the handles resolve on paho's thread, so they are only counted, never waited for
        pending = []
        for h in self._handles:
            if h.acknowledged:
                self._acked += 1
            elif h.failed:
                self._failed += 1
            else:
                pending.append(h)
        self._handles = pending

    def stats(self) -> SharerStats:
        with self._lock:
            self._settle_handles()
            return SharerStats(self._sent, self._acked, self._offline, self._rate, self._failed)
