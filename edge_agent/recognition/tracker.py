"""IoU tracker for one camera: turns per-frame face detections into tracks (one per person crossing the door).

Pure and single-threaded (the inference worker owns one per camera); time is passed in, never read, so tests and
replays drive it exactly.

Association is greedy on IoU (pairs taken best first, each track and detection at most once, a pair only above
`iou_threshold`), which for the handful of faces a door camera sees gives the Hungarian assignment in practice at
a fraction of the code. Each track predicts its box at the frame's time from a damped constant-velocity model, so a
face walking towards the camera (growing and moving) still overlaps its prediction when the worker falls behind and
takes every second or third frame.

Lifecycle: a new detection opens a *tentative* track; it becomes *confirmed* after `min_hits` matched frames (a
one-frame false detection never reaches the recognizer). A tentative track ends at its first miss; a confirmed one
after `max_missed_frames` consecutive frames without a match or `max_age_s` seconds since it was last seen,
whichever comes first (`expire(now)` applies the age to a camera that delivers no frames at all). Ended tracks are
reported once, in the update that ends them. Track ids are 1, 2, 3 ... per camera, never reused.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.errors import ConfigError
from models.types import Detection

log = logging.getLogger(__name__)

# weight of the newest box displacement in the velocity estimate; the prediction is also capped in time so that a
# track coasting through a long miss does not fly off the frame
VELOCITY_ALPHA = 0.5
MAX_PREDICT_S = 0.5


@dataclass(frozen=True)
class TrackerConfig:
    iou_threshold: float = 0.3  # least IoU between a track's predicted box and a detection to continue it
    max_missed_frames: int = 8  # a confirmed track ends after this many consecutive frames without its face
    max_age_s: float = 1.0  # ... or when it has not been seen for this long
    min_hits: int = 2  # matched frames before a track is confirmed

    def __post_init__(self) -> None:
        if isinstance(self.iou_threshold, bool) or not (
            isinstance(self.iou_threshold, (int, float)) and 0.0 < self.iou_threshold < 1.0
        ):
            raise ConfigError(f"tracker.iou_threshold: must be in (0, 1), got {self.iou_threshold!r}")
        for key in ("max_missed_frames", "min_hits"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"tracker.{key}: must be an integer >= 1, got {value!r}")
        if isinstance(self.max_age_s, bool) or not (
            isinstance(self.max_age_s, (int, float)) and math.isfinite(self.max_age_s) and self.max_age_s > 0
        ):
            raise ConfigError(f"tracker.max_age_s: must be a finite number > 0, got {self.max_age_s!r}")


class EndReason(str, enum.Enum):
    LOST = "lost"  # max_missed_frames consecutive frames without a match
    EXPIRED = "expired"  # not seen for max_age_s
    TENTATIVE = "tentative"  # missed before it was confirmed (most likely a false detection)
    FLUSHED = "flushed"  # flush(): the camera ended or the worker stops


@dataclass(frozen=True)
class TrackedFace:
    """A live track on the frame that matched it."""

    track_id: int
    detection: Detection
    first_seen: float  # ts of the track's first frame (the caller's clock: time.monotonic() in the agent)
    hits: int  # matched frames so far, this one included
    confirmed: bool


@dataclass(frozen=True)
class EndedTrack:
    track_id: int
    first_seen: float
    last_seen: float
    hits: int
    confirmed: bool
    reason: EndReason


@dataclass(frozen=True)
class TrackUpdate:
    """What one frame did: the tracks it matched (tentative ones included, see `confirmed`) and the tracks it ended."""

    ts: float
    matched: tuple[TrackedFace, ...]
    ended: tuple[EndedTrack, ...]
    live: int  # tracks alive after this frame (matched or coasting)

    @property
    def confirmed(self) -> tuple[TrackedFace, ...]:
        return tuple(t for t in self.matched if t.confirmed)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (n, 4) with every box in `b` (m, 4), boxes as x1, y1, x2, y2 -> (n, m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(ix, 0.0, None) * np.clip(iy, 0.0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0.0, None) * np.clip(a[:, 3] - a[:, 1], 0.0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def greedy_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, column) pairs, highest IoU first, each row and column used once, IoU >= threshold."""
    if iou.size == 0:
        return []
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs = []
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


class _Track:
    __slots__ = ("box", "detection", "first_seen", "hits", "last_seen", "missed", "track_id", "velocity")

    def __init__(self, track_id: int, detection: Detection, ts: float) -> None:
        self.track_id = track_id
        self.detection = detection
        self.box = np.asarray(detection.bbox, dtype=np.float64)
        self.velocity = np.zeros(4)  # box coordinates per second
        self.first_seen = ts
        self.last_seen = ts
        self.hits = 1
        self.missed = 0

    def predict(self, ts: float) -> np.ndarray:
        dt = min(max(ts - self.last_seen, 0.0), MAX_PREDICT_S)
        return self.box + self.velocity * dt

    def update(self, detection: Detection, ts: float) -> None:
        box = np.asarray(detection.bbox, dtype=np.float64)
        dt = ts - self.last_seen
        if dt > 0:
            self.velocity += VELOCITY_ALPHA * ((box - self.box) / dt - self.velocity)
        self.box = box
        self.detection = detection
        self.last_seen = ts
        self.hits += 1
        self.missed = 0

    def ended(self, confirmed: bool, reason: EndReason) -> EndedTrack:
        return EndedTrack(self.track_id, self.first_seen, self.last_seen, self.hits, confirmed, reason)


class Tracker:
    """Tracks of one camera. Not thread-safe (one owner)."""

    def __init__(self, config: TrackerConfig | None = None, *, camera: str = "") -> None:
        self.config = config or TrackerConfig()
        self.camera = camera
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._last_ts: float | None = None

    @property
    def live(self) -> int:
        return len(self._tracks)

    def _confirmed(self, track: _Track) -> bool:
        return track.hits >= self.config.min_hits

    def update(self, detections: Sequence[Detection], ts: float) -> TrackUpdate:
        """Associate one frame's detections (taken at `ts`, seconds, non-decreasing) with the live tracks."""
        if self._last_ts is not None and ts < self._last_ts:
            log.debug("camera %s: frame time went back %.3f s; treated as now", self.camera, self._last_ts - ts)
            ts = self._last_ts
        self._last_ts = ts
        cfg = self.config
        tracks = self._tracks
        predicted = np.array([t.predict(ts) for t in tracks]).reshape(-1, 4)
        boxes = np.array([d.bbox for d in detections], dtype=np.float64).reshape(-1, 4)
        pairs = greedy_match(iou_matrix(predicted, boxes), cfg.iou_threshold)
        matched_tracks = {r for r, _ in pairs}
        matched_dets = {c for _, c in pairs}
        out: list[TrackedFace] = []
        for r, c in pairs:
            track = tracks[r]
            track.update(detections[c], ts)
            out.append(
                TrackedFace(track.track_id, track.detection, track.first_seen, track.hits, self._confirmed(track))
            )
        ended: list[EndedTrack] = []
        alive: list[_Track] = []
        for i, track in enumerate(tracks):
            if i in matched_tracks:
                alive.append(track)
                continue
            track.missed += 1
            reason = self._end_reason(track, ts)
            if reason is None:
                alive.append(track)
            else:
                ended.append(track.ended(self._confirmed(track), reason))
        for c, det in enumerate(detections):
            if c in matched_dets:
                continue
            track = _Track(self._next_id, det, ts)
            self._next_id += 1
            alive.append(track)
            out.append(TrackedFace(track.track_id, det, ts, 1, self._confirmed(track)))
        self._tracks = alive
        out.sort(key=lambda t: t.track_id)
        return TrackUpdate(ts, tuple(out), tuple(ended), len(alive))

    def _end_reason(self, track: _Track, ts: float) -> EndReason | None:
        if not self._confirmed(track):
            return EndReason.TENTATIVE
        if track.missed >= self.config.max_missed_frames:
            return EndReason.LOST
        if ts - track.last_seen >= self.config.max_age_s:
            return EndReason.EXPIRED
        return None

    def expire(self, now: float) -> tuple[EndedTrack, ...]:
        """End the tracks not seen for max_age_s by `now`: for a camera that delivers no frames (reconnecting)."""
        ended = [
            t.ended(self._confirmed(t), EndReason.EXPIRED)
            for t in self._tracks
            if now - t.last_seen >= self.config.max_age_s
        ]
        if ended:
            gone = {e.track_id for e in ended}
            self._tracks = [t for t in self._tracks if t.track_id not in gone]
        return tuple(ended)

    def flush(self) -> tuple[EndedTrack, ...]:
        """End every live track (the camera ended, or the worker stops)."""
        ended = tuple(t.ended(self._confirmed(t), EndReason.FLUSHED) for t in self._tracks)
        self._tracks = []
        return ended
