"""Snapshots of attendance events: one JPEG per event under `<dir>/<YYYY-MM-DD>/<event_id>.jpg` (UTC day), named
in the event by its relative path (`snapshot` on the wire is a reference, never image bytes).

Modes: `off` (nothing stored), `face` (the face box widened by `face_margin` of its width / height on every side,
clipped to the frame), `frame` (the whole frame).

Writes are atomic (a temporary file in the same directory, fsync, rename): a reader — the offline style-transfer
worker, an upload — never sees a partial `.jpg`. Temporary files left by a crash are removed at start-up.

Retention: the oldest snapshots go (and the day directories they leave empty) once the total exceeds
`max_total_mib` or they are older than `max_age_days` (file modification time). The store keeps an index and a
running total, built by one scan at start-up, and enforces both limits after every write; call `prune()` on a
timer as well, so that age applies on a door where nobody passes for days.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from models.cache import atomic_write_bytes
from models.errors import ConfigError, ImageError, SnapshotError
from models.imageio import encode_jpeg

log = logging.getLogger(__name__)

SnapshotMode = Literal["off", "face", "frame"]
SNAPSHOT_MODES: tuple[SnapshotMode, ...] = ("off", "face", "frame")

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SUFFIX = ".jpg"
_TMP_SUFFIX = ".tmp"  # what models.cache.atomic_write_bytes names its temporary files
_DAY_S = 86_400.0
_MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class SnapshotConfig:
    mode: SnapshotMode = "face"
    dir: Path | None = None  # None: the agent's state_dir/snapshots (filled in when the config is loaded)
    jpeg_quality: int = 90
    max_age_days: float = 30
    max_total_mib: float = 1024
    face_margin: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in SNAPSHOT_MODES:
            raise ConfigError(f"snapshots.mode: expected one of {', '.join(SNAPSHOT_MODES)}, got {self.mode!r}")
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int):
            raise ConfigError(f"snapshots.jpeg_quality: expected an integer, got {self.jpeg_quality!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"snapshots.jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")
        for name in ("max_age_days", "max_total_mib"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"snapshots.{name}: must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.face_margin) and 0 <= self.face_margin <= 5):
            raise ConfigError(
                f"snapshots.face_margin: must be in [0, 5] (fraction of the face box), got {self.face_margin!r}"
            )


@dataclass(frozen=True)
class Snapshot:
    ref: str  # what the event carries: "<YYYY-MM-DD>/<event_id>.jpg", relative to the snapshot directory
    path: Path
    size: int  # bytes
    mtime: float  # Unix time of the write


class SnapshotStore:
    """Thread-safe: `save()` from the pipeline, `prune()` from a timer, `iter_snapshots()` from the NST worker."""

    def __init__(self, config: SnapshotConfig) -> None:
        self._config = config
        if config.dir is None:
            raise ConfigError("snapshots.dir: a snapshot store needs its folder")
        self._root = config.dir
        self._max_bytes = int(config.max_total_mib * _MIB)
        self._max_age_s = config.max_age_days * _DAY_S
        self._lock = threading.Lock()
        # insertion order is age order (oldest first): the scan sorts by mtime, later writes append
        self._index: dict[str, Snapshot] = {}
        self._total = 0
        self._scan()
        self.prune()

    @property
    def config(self) -> SnapshotConfig:
        return self._config

    def save(
        self, event_id: str, frame: np.ndarray, bbox: tuple[float, float, float, float], *, at: datetime | None = None
    ) -> str | None:
        """Store the snapshot of event `event_id` (an RGB uint8 HxWx3 frame and the face box x1, y1, x2, y2 in it;
        `at`: the event's time, for the day directory, default now). Returns the reference, None in mode `off`.
        Raises ImageError for an unusable frame or box, SnapshotError when the file cannot be written."""
        if self._config.mode == "off":
            return None
        try:
            name = str(uuid.UUID(event_id))  # the id becomes a file name: nothing but a canonical UUID gets there
        except (ValueError, TypeError):
            raise SnapshotError(f"snapshot: event id {event_id!r} is not a UUID") from None
        _check_frame(frame)
        image = face_crop(frame, bbox, self._config.face_margin) if self._config.mode == "face" else frame
        data = encode_jpeg(image, self._config.jpeg_quality)
        moment = at if at is not None else datetime.now(timezone.utc)
        if moment.tzinfo is None:
            raise SnapshotError("snapshot: `at` must be an aware datetime (timezone.utc)")
        ref = f"{moment.astimezone(timezone.utc):%Y-%m-%d}/{name}{_SUFFIX}"
        path = self._root / ref
        with self._lock:  # held across the write: prune() must not remove the day directory under it
            try:
                atomic_write_bytes(path, data)
                mtime = path.stat().st_mtime
            except OSError as exc:
                raise SnapshotError(f"snapshot of event {name}: cannot write {path}: {exc}") from exc
            old = self._index.pop(ref, None)  # the same event saved again replaces its file
            if old is not None:
                self._total -= old.size
            self._index[ref] = Snapshot(ref, path, len(data), mtime)
            self._total += len(data)
            self._prune_locked(time.time())
        log.debug(
            "snapshot %s saved (%d bytes; store %d files, %d bytes)", ref, len(data), len(self._index), self._total
        )
        return ref

    def prune(self, now: float | None = None) -> int:
        """Enforce both limits now (`now`: Unix time); returns how many snapshots were deleted."""
        with self._lock:
            return self._prune_locked(time.time() if now is None else now)

    def iter_snapshots(self) -> Iterator[Snapshot]:
        """The stored snapshots, oldest first (a copy: the store may change while the caller iterates)."""
        with self._lock:
            snapshots = list(self._index.values())
        return iter(snapshots)

    def total_bytes(self) -> int:
        return self._total

    # ---- internals ----

    def _prune_locked(self, now: float) -> int:
        removed = 0
        while self._index:
            oldest = next(iter(self._index.values()))
            too_old = oldest.mtime < now - self._max_age_s
            # the newest snapshot is kept even alone over the size limit: it was just promised to an event
            too_big = self._total > self._max_bytes and len(self._index) > 1
            if not (too_old or too_big):
                break
            self._remove_locked(oldest)
            removed += 1
        if removed:
            log.info(
                "snapshots: %d removed by retention (store %d files, %d bytes)", removed, len(self._index), self._total
            )
        return removed

    def _remove_locked(self, snap: Snapshot) -> None:
        del self._index[snap.ref]
        self._total -= snap.size
        # the snapshot and what was derived from it (`<id>.<style>.jpg`, the style worker's paintings)
        for path in (snap.path, *snap.path.parent.glob(f"{snap.path.stem}.*{_SUFFIX}")):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # forgotten anyway: retrying every write would not make it deletable
                log.warning("snapshots: cannot delete %s: %s", path, exc)
        day = snap.path.parent
        try:
            if next(day.iterdir(), None) is None:
                day.rmdir()
        except OSError as exc:
            log.warning("snapshots: cannot tidy %s: %s", day, exc)

    def _scan(self) -> None:
        if not self._root.is_dir():
            return
        found: list[Snapshot] = []
        for day in self._root.iterdir():
            if not (day.is_dir() and _DAY.fullmatch(day.name)):
                continue  # not ours: left alone
            for path in day.iterdir():
                try:
                    if path.name.endswith(_TMP_SUFFIX):
                        path.unlink()  # a write cut short by a crash
                        log.info("snapshots: removed the unfinished write %s", path)
                    elif path.suffix == _SUFFIX and "." not in path.stem and path.is_file():  # not a derived file
                        st = path.stat()
                        found.append(Snapshot(f"{day.name}/{path.name}", path, st.st_size, st.st_mtime))
                except OSError as exc:
                    log.warning("snapshots: skipping %s: %s", path, exc)
        found.sort(key=lambda s: (s.mtime, s.ref))
        self._index = {s.ref: s for s in found}
        self._total = sum(s.size for s in found)
        log.info("snapshots: %d files, %.1f MiB in %s", len(found), self._total / _MIB, self._root)


def face_crop(frame: np.ndarray, bbox: tuple[float, float, float, float], margin: float) -> np.ndarray:
    """The face box widened by `margin` of its size on every side, clipped to the frame (a view, not a copy)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise ImageError(f"snapshot: face box {bbox!r} is not x1 < x2, y1 < y2 in finite numbers")
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    height, width = frame.shape[:2]
    left, top = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
    right, bottom = min(width, math.ceil(x2 + mx)), min(height, math.ceil(y2 + my))
    if right <= left or bottom <= top:
        raise ImageError(f"snapshot: face box {bbox!r} lies outside the {width}x{height} frame")
    return frame[top:bottom, left:right]


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ImageError(f"snapshot: expected an RGB uint8 HxWx3 frame, got {type(frame).__name__} {shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ImageError("snapshot: the frame is empty")
