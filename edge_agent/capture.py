"""Camera sources through OpenCV: one reader thread per camera that keeps only the newest frame.

A door camera produces frames faster than a small edge box can analyse them; queueing them would only add latency
and memory, so each camera holds a single slot that the reader overwrites (the frames nobody took are counted as
dropped). Sources: video files (demos, benchmarks, tests), network streams (RTSP, HTTP MJPEG) through FFMPEG, V4L2
devices, and GStreamer pipelines (Jetson hardware decoding). A lost source is reopened with exponential backoff; the
reader thread never raises.
"""

from __future__ import annotations

import enum
import logging
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from models.errors import CaptureError, ConfigError, SourceUnavailableError

log = logging.getLogger(__name__)

# FFMPEG waits this long to connect and then for each packet: bounds how long a dead network source can block the
# reader (and therefore how long stop() may have to wait for it).
NETWORK_OPEN_TIMEOUT_MS = 10_000
NETWORK_READ_TIMEOUT_MS = 5_000
# Used to pace a file whose container does not state its frame rate.
DEFAULT_FILE_FPS = 25.0
# Weight of the newest frame interval in the fps estimate (about the last 10 frames count).
FPS_EMA_ALPHA = 0.1
BACKOFF_JITTER = 0.2  # +-20 %: cameras that lost the same network do not all retry in step

# outcomes of one read besides an error message
_READ_OK = "ok"
_END_OF_FILE = "end of file"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DEVICE = re.compile(r"^(?:\d+|/dev/\S+)$")
_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")


class SourceKind(str, enum.Enum):
    FILE = "file"
    NETWORK = "network"  # rtsp://, http://, ... read by FFMPEG
    V4L2 = "v4l2"
    GSTREAMER = "gstreamer"


class CameraState(str, enum.Enum):
    IDLE = "idle"  # not started
    CONNECTING = "connecting"  # started, first open in progress
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the source failed; waiting out the backoff or reopening
    ENDED = "ended"  # a file without loop reached its end
    STOPPED = "stopped"


def source_kind(source: str) -> SourceKind:
    """Classify a camera source string (see CameraConfig.source)."""
    text = source.strip()
    if "!" in text and text.rsplit("!", 1)[1].strip().startswith("appsink"):
        return SourceKind.GSTREAMER
    if _DEVICE.match(text):
        return SourceKind.V4L2
    if _URL.match(text):
        return SourceKind.NETWORK
    return SourceKind.FILE


def redact_source(source: str) -> str:
    """The source for logs and errors, without the user:password of a URL."""
    return _CREDENTIALS.sub(r"\1***@", source)


@dataclass(frozen=True)
class CameraConfig:
    name: str
    # A video file path, an RTSP / HTTP URL, a V4L2 device (`/dev/video0`, `/dev/v4l/by-id/...`, or an index "0"),
    # or a GStreamer pipeline ending in an appsink.
    source: str
    loop: bool = False  # files only: restart at the end (demos, benchmarks)
    # Files only: deliver frames at the file's own frame rate, like a camera. False: each frame waits until the
    # previous one was taken, so every frame is processed as fast as the consumer goes (benchmarks, tests).
    realtime: bool = True
    max_fps: float | None = None  # deliver at most this many frames per second (the others are skipped)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    width: int | None = None  # V4L2 only: requested capture size
    height: int | None = None

    def __post_init__(self) -> None:
        if not self.name.strip() or self.name != self.name.strip():
            raise ConfigError(f"camera name: must be non-empty without surrounding spaces, got {self.name!r}")
        where = f"camera {self.name!r}"
        if not self.source.strip():
            raise ConfigError(f"{where}: source: must not be empty")
        kind = self.kind
        if kind is not SourceKind.FILE and self.loop:
            raise ConfigError(f"{where}: loop: only applies to video files, the source is a {kind.value} source")
        if kind is not SourceKind.FILE and not self.realtime:
            raise ConfigError(f"{where}: realtime: only a video file can be read slower than real time")
        if self.max_fps is not None and not self.max_fps > 0:
            raise ConfigError(f"{where}: max_fps: must be > 0, got {self.max_fps}")
        if not self.reconnect_min_s > 0:
            raise ConfigError(f"{where}: reconnect_min_s: must be > 0, got {self.reconnect_min_s}")
        if not self.reconnect_max_s >= self.reconnect_min_s:
            raise ConfigError(
                f"{where}: reconnect_max_s: must be >= reconnect_min_s ({self.reconnect_min_s}), "
                f"got {self.reconnect_max_s}"
            )
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is None:
                continue
            if value <= 0:
                raise ConfigError(f"{where}: {key}: must be > 0, got {value}")
            if kind is not SourceKind.V4L2:
                raise ConfigError(f"{where}: {key}: only applies to V4L2 devices, the source is a {kind.value} source")
        if (self.width is None) != (self.height is None):
            raise ConfigError(f"{where}: width and height: give both or neither")

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.source)


@dataclass(frozen=True, eq=False)
class Frame:
    camera: str
    seq: int  # 1, 2, 3 ... per camera, never reused (also across reconnects and loops)
    image: np.ndarray  # H x W x 3 BGR uint8, read-only: one frame may be shared by several consumers
    captured_at: float  # time.monotonic() when it was read
    wall_time: datetime  # UTC
    position_ms: float | None = None  # files: the frame's timestamp in the file


@dataclass(frozen=True)
class CameraStats:
    state: CameraState
    fps: float  # EMA over frames read from the source
    frames_read: int
    frames_dropped: int  # delivered to the slot but overwritten before anybody took them
    frames_skipped: int  # read but not delivered because of max_fps
    reconnects: int  # successful opens after a failure
    last_error: str | None
    last_frame_at: float | None  # time.monotonic() of the newest delivered frame


@lru_cache(maxsize=1)
def gstreamer_available() -> bool:
    match = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(match) and match.group(1).upper() == "YES"


def check_supported(kind: SourceKind) -> None:
    """Raise CaptureError when this OpenCV build cannot open sources of this kind at all (never worth a retry)."""
    if kind is SourceKind.GSTREAMER and not gstreamer_available():
        raise CaptureError(
            "this OpenCV was built without GStreamer (see cv2.getBuildInformation()); GStreamer pipelines need the "
            "distribution's OpenCV (e.g. JetPack's python3-opencv) instead of the opencv-python wheel"
        )


def open_capture(config: CameraConfig) -> cv2.VideoCapture:
    """Open the source with the backend its kind needs; SourceUnavailableError when it cannot be opened now."""
    kind = config.kind
    check_supported(kind)
    shown = redact_source(config.source)
    if kind is SourceKind.FILE:
        if not Path(config.source).is_file():
            raise SourceUnavailableError(f"{shown}: no such file")
        cap = cv2.VideoCapture(config.source, cv2.CAP_FFMPEG)
    elif kind is SourceKind.NETWORK:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_OPEN_TIMEOUT_MS]
        params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_READ_TIMEOUT_MS]
        cap = cv2.VideoCapture(config.source, cv2.CAP_FFMPEG, params)
    elif kind is SourceKind.V4L2:
        device = config.source.strip()
        cap = cv2.VideoCapture(int(device) if device.isdigit() else device, cv2.CAP_V4L2)
    else:
        cap = cv2.VideoCapture(config.source, cv2.CAP_GSTREAMER)
    if not cap.isOpened():
        cap.release()
        raise SourceUnavailableError(f"{shown}: OpenCV cannot open this {kind.value} source")
    if kind is SourceKind.V4L2:
        # a one-frame driver queue keeps a V4L2 camera's frames fresh when we fall behind
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if config.width is not None and config.height is not None:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
            got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            if got != (config.width, config.height):
                log.warning(
                    "camera %s: asked %s for %dx%d, it delivers %dx%d",
                    config.name,
                    shown,
                    config.width,
                    config.height,
                    *got,
                )
    return cap


class Camera:
    """Reads one source on its own thread into a single overwritten slot.

    `condition` lets several cameras share one lock and wake-up (CameraSet); a lone camera makes its own.
    """

    def __init__(self, config: CameraConfig, *, condition: threading.Condition | None = None) -> None:
        self.config = config
        self._cond = condition or threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._random = random.Random()
        # everything below is guarded by self._cond
        self._frame: Frame | None = None
        self._taken = 0  # highest seq handed to a consumer
        self._seq = 0
        self._state = CameraState.IDLE
        self._ema_interval: float | None = None
        self._last_read: float | None = None
        self._read = 0
        self._dropped = 0
        self._skipped = 0
        self._reconnects = 0
        self._last_error: str | None = None
        # reader-thread only
        self._frame_period = 1.0 / DEFAULT_FILE_FPS
        self._clock_origin = 0.0  # monotonic time at which a file's position 0 is due
        self._clock_due: float | None = None  # when the last file frame was due; kept across a loop
        self._frames_since_open = 0
        self._next_delivery = 0.0  # max_fps: the earliest time of the next delivery

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        """Start the reader thread (no-op while it runs). CaptureError when the source kind is unsupported here."""
        check_supported(self.config.kind)
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._clock_due = None  # a restarted file is paced from now, not from where it stopped
        with self._cond:
            self._state = CameraState.CONNECTING
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading and release the source. A backoff or pacing wait ends at once; a network read blocked in
        FFMPEG can take up to NETWORK_READ_TIMEOUT_MS, past `timeout` the thread finishes (and releases) alone."""
        self._request_stop()
        self._join(timeout)

    def _request_stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "camera %s: reader still blocked in the source after %.1f s; exits by itself", self.name, timeout
                )
        with self._cond:
            if self._state is not CameraState.ENDED:
                self._state = CameraState.STOPPED
            self._cond.notify_all()

    def __enter__(self) -> Camera:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def latest(self, after_seq: int = 0, timeout: float = 0.0) -> Frame | None:
        """The newest frame with seq > after_seq, waiting up to `timeout` s for one; None on timeout, or at once
        when the camera has ended or is not running and holds no newer frame."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self._take(after_seq)
                if frame is not None or self._finished():
                    return frame
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def stats(self) -> CameraStats:
        with self._cond:
            return CameraStats(
                state=self._state,
                fps=1.0 / self._ema_interval if self._ema_interval else 0.0,
                frames_read=self._read,
                frames_dropped=self._dropped,
                frames_skipped=self._skipped,
                reconnects=self._reconnects,
                last_error=self._last_error,
                last_frame_at=self._frame.captured_at if self._frame is not None else None,
            )

    # --- called with self._cond held ------------------------------------------------------------------------------
    def _take(self, after_seq: int) -> Frame | None:
        frame = self._frame
        if frame is None or frame.seq <= after_seq:
            return None
        self._taken = max(self._taken, frame.seq)
        self._cond.notify_all()  # a non-realtime file reader waits for this
        return frame

    def _finished(self) -> bool:
        return self._state in (CameraState.IDLE, CameraState.ENDED, CameraState.STOPPED)

    # --- reader thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        cap: cv2.VideoCapture | None = None
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    if cap is None:
                        cap = open_capture(self.config)
                        self._opened(cap, failures)
                    outcome = self._read_one(cap)
                except SourceUnavailableError as exc:
                    outcome = str(exc)
                except Exception as exc:  # the thread must survive anything a backend throws
                    outcome = f"{type(exc).__name__}: {exc}"
                    if failures == 0 and not isinstance(exc, cv2.error):
                        log.exception("camera %s: unexpected error while reading", self.name)
                if outcome == _READ_OK:
                    failures = 0
                    continue
                if cap is not None:
                    cap.release()
                    cap = None
                if outcome == _END_OF_FILE:
                    if not self.config.loop:
                        self._set_state(CameraState.ENDED)
                        log.info("camera %s: end of %s", self.name, redact_source(self.config.source))
                        return
                    continue  # reopen at the start, no backoff
                self._clock_due = None  # after a failure a file restarts its pacing from now
                failures += 1
                self._failed(outcome, failures)
                self._stop.wait(self._backoff(failures))
        finally:
            if cap is not None:
                cap.release()
            with self._cond:
                if self._stop.is_set() and self._state is not CameraState.ENDED:
                    self._state = CameraState.STOPPED
                self._cond.notify_all()

    def _opened(self, cap: cv2.VideoCapture, failures: int) -> None:
        fps = cap.get(cv2.CAP_PROP_FPS)
        self._frame_period = 1.0 / fps if 0 < fps < 1000 else 1.0 / DEFAULT_FILE_FPS
        now = time.monotonic()
        # a looping file shows its first frame one period after its last, as a camera would
        self._clock_origin = now if self._clock_due is None else self._clock_due + self._frame_period
        self._frames_since_open = 0
        self._next_delivery = now
        with self._cond:
            if failures:
                self._reconnects += 1
            self._state = CameraState.CONNECTED
        if failures:
            log.info("camera %s: source open again after %d failed attempt(s)", self.name, failures)

    def _read_one(self, cap: cv2.VideoCapture) -> str:
        cfg = self.config
        is_file = cfg.kind is SourceKind.FILE
        interval = 1.0 / cfg.max_fps if cfg.max_fps else 0.0
        if not cfg.realtime and interval:
            # a non-realtime file honours max_fps by waiting, not by skipping frames
            self._stop.wait(max(0.0, self._next_delivery - time.monotonic()))
        if not cap.grab():
            if is_file and self._frames_since_open:
                return _END_OF_FILE
            return "the source delivered no frame" if is_file else "the stream ended or stopped delivering frames"
        self._frames_since_open += 1
        position = cap.get(cv2.CAP_PROP_POS_MSEC) if is_file else None
        if is_file and cfg.realtime and position is not None:
            due = self._clock_origin + position / 1000.0
            self._clock_due = due
            self._stop.wait(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        with self._cond:
            self._count_read(now)
            if interval and cfg.realtime and now < self._next_delivery:
                self._skipped += 1
                return _READ_OK
        ok, image = cap.retrieve()
        if not ok or image is None:
            return "the source delivered an undecodable frame"
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        image.setflags(write=False)
        if interval:
            self._next_delivery = max(self._next_delivery + interval, now + interval / 2)
        self._deliver(image, now, position)
        return _READ_OK

    def _count_read(self, now: float) -> None:
        self._read += 1
        if self._last_read is not None:
            dt = now - self._last_read
            self._ema_interval = (
                dt if self._ema_interval is None else self._ema_interval + FPS_EMA_ALPHA * (dt - self._ema_interval)
            )
        self._last_read = now

    def _deliver(self, image: np.ndarray, now: float, position: float | None) -> None:
        with self._cond:
            if self._frame is not None and self._frame.seq > self._taken:
                self._dropped += 1
            self._seq += 1
            self._frame = Frame(self.name, self._seq, image, now, datetime.now(timezone.utc), position)
            self._cond.notify_all()
            if not self.config.realtime:
                while self._taken < self._seq and not self._stop.is_set():
                    self._cond.wait()

    def _set_state(self, state: CameraState) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def _failed(self, reason: str, failures: int) -> None:
        with self._cond:
            self._state = CameraState.RECONNECTING
            self._last_error = reason
            self._cond.notify_all()
        if failures == 1:
            log.warning(
                "camera %s: %s; retrying every %.1f..%.1f s (backoff) until it is back",
                self.name,
                reason,
                self.config.reconnect_min_s,
                self.config.reconnect_max_s,
            )
        else:
            log.debug("camera %s: attempt %d failed: %s", self.name, failures, reason)

    def _backoff(self, failures: int) -> float:
        cfg = self.config
        delay = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2.0 ** min(failures - 1, 30))
        return min(cfg.reconnect_max_s, delay * self._random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))


class CameraSet:
    """Several cameras and one consumer that takes the next new frame from any of them, round-robin among the
    cameras that have one, so a fast camera cannot starve a slow one."""

    def __init__(self, configs: Sequence[CameraConfig]) -> None:
        if not configs:
            raise ConfigError("cameras: at least one camera is needed")
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"cameras: duplicate camera name(s) {', '.join(map(repr, duplicates))}")
        self._cond = threading.Condition()
        self.cameras = tuple(Camera(c, condition=self._cond) for c in configs)
        self._seen = [0] * len(self.cameras)
        self._next = 0

    def start(self) -> None:
        for camera in self.cameras:
            camera.start()

    def stop(self, timeout: float = 2.0) -> None:
        for camera in self.cameras:
            camera._request_stop()
        for camera in self.cameras:
            camera._join(timeout)

    def __enter__(self) -> CameraSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def next_frame(self, timeout: float) -> Frame | None:
        """The next frame not yet returned, from the camera after the one served last; None on timeout, or at once
        when every camera has ended or stopped."""
        deadline = time.monotonic() + timeout
        count = len(self.cameras)
        with self._cond:
            while True:
                for k in range(count):
                    i = (self._next + k) % count
                    frame = self.cameras[i]._take(self._seen[i])
                    if frame is not None:
                        self._seen[i] = frame.seq
                        self._next = (i + 1) % count
                        return frame
                if all(camera._finished() for camera in self.cameras):
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def stats(self) -> dict[str, CameraStats]:
        return {camera.name: camera.stats() for camera in self.cameras}
