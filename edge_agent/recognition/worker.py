"""The inference worker: one thread that owns the face models and turns camera frames into track decisions.

Per frame (the newest one of the next camera, `CameraSet.next_frame`): BGR -> RGB, detect, update that camera's
tracker, ask its recognizer which tracks need a sample now, align those faces, gate the chips, encode every
accepted chip of the frame in **one** batch, search the gallery in service (`IndexHolder.current`, taken once per
frame), hand the samples to the recognizer and deliver the decisions it makes to `on_decision` (on this thread:
keep the callback short, e.g. gate + snapshot + outbox write).

Only this thread touches the models (ONNX Runtime sessions and TensorRT contexts are not shared across threads).
A bad frame or a model exception is logged (at most once per `error_log_interval_s` with its traceback) and the
loop goes on with the next frame; an exception in `on_decision` likewise.

Before measuring anything the worker warms the models up on a blank frame (Frigate does the same): the first
runs of an ONNX Runtime / TensorRT session allocate and tune, and would otherwise dominate the latency figures.
Figures are EMAs (`ema_alpha`) in milliseconds per stage: detect (per frame), track (per frame), align (per frame
that aligned chips, the chip quality gate included), encode (per batch), match (gallery search, voting and
deciding), frame (everything); fps overall and per camera (frames processed per second), plus the cameras' own
figures (frames dropped because the worker was busy, skipped by max_fps). `stats()` returns them as a frozen
`WorkerStats` with `to_dict()` for the status reporter; `idle()` tells a low-priority worker (the offline style
transfer) whether the door is quiet.

The worker does not start or stop the cameras (the agent owns them); when every camera has finished (files that
ended, or cameras stopped) it ends all tracks, delivers their decisions and sets `wait_sources_ended`. On `stop()`
live tracks are ended and decided the same way, so a person at the door during a restart is not lost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import cv2
import numpy as np

from edge_agent.capture import CameraConfig, CameraSet, CameraState, Frame
from edge_agent.gallery.index import GalleryIndex, IndexHolder
from edge_agent.recognition.attendance import AttendanceConfig, AttendanceGate
from edge_agent.recognition.latency import LatencyEma
from edge_agent.recognition.recognizer import DEFAULT_RULE, RecognitionConfig, Recognizer, TrackDecision
from edge_agent.recognition.tracker import EndedTrack, Tracker, TrackerConfig, TrackUpdate
from models.decision.rules import DecisionRule
from models.errors import ConfigError, ImageError
from models.face.pipeline import FacePipeline
from models.types import Detection

log = logging.getLogger(__name__)

_FINISHED = (CameraState.IDLE, CameraState.ENDED, CameraState.STOPPED)  # next_frame returns None at once
_ENDED = (CameraState.ENDED, CameraState.STOPPED)  # will deliver nothing more (IDLE: not started yet)
HOUSEKEEPING_INTERVAL_S = 0.2  # how often tracks of cameras that deliver nothing are aged out
DEFAULT_FRAME_PERIOD_S = 1.0 / 25  # media clock: the step assumed when a looping file starts again

Clock = Literal["capture", "media"]
CLOCKS: tuple[Clock, ...] = ("capture", "media")


@dataclass(frozen=True)
class WorkerConfig:
    frame_timeout_s: float = 0.2  # longest wait for a frame before housekeeping runs
    ema_alpha: float = 0.1  # weight of the newest measurement in every latency / fps figure
    warmup: bool = True
    warmup_width: int = 640  # the blank warm-up frame: the cameras' usual size gives the session its shapes
    warmup_height: int = 480
    error_log_interval_s: float = 10.0  # tracebacks of repeated failures at most this often
    # The time tracks and samples are measured in. "capture": when the frame was read (time.monotonic(); live
    # cameras). "media": the frame's position in its file (benchmarks and tests that read files faster or slower
    # than real time: the tracker and the recognizer then see the video's own time, so the outcome does not depend
    # on how fast this machine is); sources without a position fall back to the capture time.
    clock: Clock = "capture"

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ConfigError(f"worker.clock: expected one of {', '.join(CLOCKS)}, got {self.clock!r}")
        for key in ("frame_timeout_s", "error_log_interval_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"worker.{key}: must be a finite number > 0, got {value!r}")
        if isinstance(self.ema_alpha, bool) or not isinstance(self.ema_alpha, (int, float)):
            raise ConfigError(f"worker.ema_alpha: must be a number, got {self.ema_alpha!r}")
        if not 0 < self.ema_alpha <= 1:
            raise ConfigError(f"worker.ema_alpha: must be in (0, 1], got {self.ema_alpha}")
        for key in ("warmup_width", "warmup_height"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 32 <= value <= 8192:
                raise ConfigError(f"worker.{key}: must be an integer in [32, 8192], got {value!r}")


@dataclass(frozen=True)
class CameraFigures:
    fps: float  # frames of this camera processed per second (EMA)
    frames: int  # processed
    source_fps: float  # frames read from the source per second (the camera's EMA)
    dropped: int  # overwritten before the worker took them (the worker was busy)
    skipped: int  # not delivered because of the camera's max_fps
    state: str


@dataclass(frozen=True)
class WorkerStats:
    running: bool
    warmed_up: bool
    frames: int  # processed
    frames_failed: int  # processing raised (logged, skipped)
    frames_dropped: int  # all cameras: overwritten before the worker took them
    frames_skipped: int  # all cameras: skipped by max_fps
    fps: float  # frames processed per second, all cameras (EMA)
    load: float  # fraction of the time spent processing (EMA): 1.0 = the worker never waits for a frame
    detect_ms: float
    track_ms: float
    align_ms: float
    encode_ms: float
    match_ms: float
    frame_ms: float
    encode_batch: float  # chips per encode (EMA)
    faces: int  # detections
    encodes: int  # chips encoded
    samples_rejected: int  # faces refused by the quality gate
    rejected: Mapping[str, int]  # the same by models.face.quality reason code
    tracks_live: int
    decisions_known: int
    decisions_unknown: int
    tracks_unusable: int  # ended without a usable face (no decision)
    callback_errors: int
    seconds_since_face: float | None  # None: no face since start
    cameras: Mapping[str, CameraFigures] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        """Flat numbers for a status payload and the metrics endpoint: top-level figures by name, cameras as
        `camera.<name>.<figure>`, rejections as `rejected.<reason>`. Counts that only grow get a `_total` suffix
        (`frames_total`, `camera.<name>.dropped_total`: Prometheus counters); booleans are 0 / 1;
        `seconds_since_face` is left out while None and a camera's state (not a number) always."""
        out: dict[str, float] = {}
        for key, value in self.__dict__.items():
            if key in ("cameras", "rejected") or value is None:
                continue
            name = f"{key}_total" if key in _COUNTERS else key
            out[name] = float(value) if isinstance(value, bool) else value
        for reason, count in self.rejected.items():
            out[f"rejected.{reason}"] = count
        for camera, figures in self.cameras.items():
            for key, value in figures.__dict__.items():
                if key != "state":
                    out[f"camera.{camera}.{key}_total" if key in _COUNTERS else f"camera.{camera}.{key}"] = value
        return out


# WorkerStats / CameraFigures fields that only grow
_COUNTERS = frozenset(
    {
        "frames",
        "frames_failed",
        "frames_dropped",
        "frames_skipped",
        "faces",
        "encodes",
        "samples_rejected",
        "decisions_known",
        "decisions_unknown",
        "tracks_unusable",
        "callback_errors",
        "dropped",
        "skipped",
    }
)


@dataclass(frozen=True)
class IdleState:
    """For low-priority work (offline style transfer): is the door quiet and is there CPU / GPU to spare?"""

    busy: bool  # processing a frame at this moment
    faces_present: bool  # some camera has a live track
    seconds_since_face: float | None  # None: no face since start
    load: float  # the worker's busy fraction (EMA)

    def quiet_for(self, seconds: float) -> bool:
        """No face now and none for `seconds`."""
        return not self.faces_present and (self.seconds_since_face is None or self.seconds_since_face >= seconds)


class InferenceWorker:
    """See the module docstring. `on_decision` is called on the worker thread with each TrackDecision."""

    def __init__(
        self,
        pipeline: FacePipeline,
        cameras: CameraSet,
        holder: IndexHolder,
        on_decision: Callable[[TrackDecision], None],
        *,
        tracker: TrackerConfig | None = None,
        recognition: RecognitionConfig | None = None,
        rule: DecisionRule = DEFAULT_RULE,
        site_rules: bool = False,
        config: WorkerConfig | None = None,
    ) -> None:
        """`rule` and `site_rules`: see `edge_agent.recognition.recognizer.rule_in_force`."""
        self.pipeline = pipeline
        self.cameras = cameras
        self.holder = holder
        self.on_decision = on_decision
        self.tracker_config = tracker or TrackerConfig()
        self.recognition_config = recognition or RecognitionConfig()
        self.rule = rule
        self.site_rules = site_rules
        self.config = config or WorkerConfig()
        self._fingerprint = pipeline.fingerprint
        self._trackers: dict[str, Tracker] = {}
        self._recognizers: dict[str, Recognizer] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._sources_ended = threading.Event()
        self._lock = threading.Lock()  # guards the figures below for readers on other threads
        alpha = self.config.ema_alpha
        self._ema = {
            name: LatencyEma(alpha) for name in ("detect", "track", "align", "encode", "match", "frame", "batch")
        }
        self._interval = LatencyEma(alpha)
        self._load = LatencyEma(alpha)
        self._camera_interval: dict[str, LatencyEma] = {}
        self._camera_frames: dict[str, int] = {}
        self._camera_last: dict[str, float] = {}
        self._frames = 0
        self._failed = 0
        self._faces = 0
        self._encodes = 0
        self._callback_errors = 0
        self._busy = False
        self._last_end: float | None = None
        self._last_record: float | None = None
        self._last_face: float | None = None
        self._live_tracks = 0
        self._warmed = False
        self._last_error_log: dict[str, float] = {}  # kind of failure -> when its traceback was last logged
        self._last_housekeeping = 0.0
        self._media: dict[str, tuple[float, float, float]] = {}  # camera -> (offset, last position, last ts)

    # --- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._ready.clear()
        self._sources_ended.clear()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the frame in progress; live tracks are ended and their decisions delivered first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("inference worker still busy after %.1f s; it stops after its current frame", timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the models are warmed up and the worker takes frames."""
        return self._ready.wait(timeout)

    def wait_sources_ended(self, timeout: float | None = None) -> bool:
        """True once every camera has finished and the tracks they left were decided (files without loop)."""
        return self._sources_ended.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- figures ----------------------------------------------------------------------------------------------------
    def stats(self) -> WorkerStats:
        camera_stats = self.cameras.stats()
        now = time.monotonic()
        with self._lock:
            rec = [r.stats() for r in self._recognizers.values()]
            rejected: Counter[str] = Counter()
            for r in rec:
                rejected.update(r.rejected)
            cameras = {
                name: CameraFigures(
                    fps=_rate(self._camera_interval[name]) if name in self._camera_interval else 0.0,
                    frames=self._camera_frames.get(name, 0),
                    source_fps=cs.fps,
                    dropped=cs.frames_dropped,
                    skipped=cs.frames_skipped,
                    state=cs.state.value,
                )
                for name, cs in camera_stats.items()
            }
            ema = {k: _value(v) for k, v in self._ema.items()}
            return WorkerStats(
                running=self.running,
                warmed_up=self._warmed,
                frames=self._frames,
                frames_failed=self._failed,
                frames_dropped=sum(c.frames_dropped for c in camera_stats.values()),
                frames_skipped=sum(c.frames_skipped for c in camera_stats.values()),
                fps=_rate(self._interval),
                load=_value(self._load),
                detect_ms=ema["detect"],
                track_ms=ema["track"],
                align_ms=ema["align"],
                encode_ms=ema["encode"],
                match_ms=ema["match"],
                frame_ms=ema["frame"],
                encode_batch=ema["batch"],
                faces=self._faces,
                encodes=self._encodes,
                samples_rejected=sum(rejected.values()),
                rejected=MappingProxyType(dict(rejected)),
                tracks_live=self._live_tracks,
                decisions_known=sum(r.decisions_known for r in rec),
                decisions_unknown=sum(r.decisions_unknown for r in rec),
                tracks_unusable=sum(r.tracks_unusable for r in rec),
                callback_errors=self._callback_errors,
                seconds_since_face=None if self._last_face is None else max(0.0, now - self._last_face),
                cameras=MappingProxyType(cameras),
            )

    def idle(self) -> IdleState:
        now = time.monotonic()
        with self._lock:
            return IdleState(
                busy=self._busy,
                faces_present=self._live_tracks > 0,
                seconds_since_face=None if self._last_face is None else max(0.0, now - self._last_face),
                load=_value(self._load),
            )

    # --- the loop ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.config.warmup:
                self._warm_up()
            with self._lock:
                self._warmed = True
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception:  # never the frame's fault (_step handles those): back off a little, go on
                    self._log_failure("loop", "inference loop iteration failed")
                    self._stop.wait(self.config.frame_timeout_s)
        finally:
            self._flush()
            self._ready.set()

    def _iteration(self) -> None:
        frame = self.cameras.next_frame(self.config.frame_timeout_s)
        if frame is None:
            self._housekeeping(time.monotonic(), force=True)
            states = [s.state for s in self.cameras.stats().values()]
            if all(state in _ENDED for state in states) and not self._sources_ended.is_set():
                self._flush()
                self._sources_ended.set()
            if all(state in _FINISHED for state in states):
                self._stop.wait(self.config.frame_timeout_s)  # next_frame would return at once
            return
        self._sources_ended.clear()
        self._step(frame)
        self._housekeeping(time.monotonic(), skip=frame.camera)

    def _step(self, frame: Frame) -> None:
        started = time.monotonic()
        with self._lock:
            self._busy = True
            waited = 0.0 if self._last_end is None else max(0.0, started - self._last_end)
        try:
            decisions = self._process(frame)
        except Exception:
            with self._lock:
                self._failed += 1
            self._log_failure("frame", f"camera {frame.camera}: frame {frame.seq} failed")
            decisions = []
        ended = time.monotonic()
        with self._lock:
            self._busy = False
            if self._last_end is not None:
                busy = ended - started
                self._load.add(busy / max(busy + waited, 1e-9))
            self._last_end = ended
        self._deliver(decisions)

    def _process(self, frame: Frame) -> list[TrackDecision]:
        t0 = time.perf_counter()
        rgb = cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB)
        detections = self.pipeline.detect(rgb)
        t1 = time.perf_counter()
        tracker, recognizer = self._per_camera(frame.camera)
        ts = self._frame_ts(frame)
        update = tracker.update(detections, ts)
        t2 = time.perf_counter()
        index = self.holder.current
        align_s = encode_s = 0.0
        batch = 0
        try:
            align_s, encode_s, batch = self._sample(recognizer, update, rgb, ts, frame.wall_time, index)
        except Exception:
            # the tracker has moved on: the tracks this frame ended must still be decided below
            self._log_failure("sampling", f"camera {frame.camera}: sampling frame {frame.seq} failed")
        decisions = recognizer.decide(update.ended, index, ts, frame.wall_time)
        t3 = time.perf_counter()
        # match: the gallery search and the recognizer's bookkeeping, i.e. what is neither tracking, aligning nor
        # encoding between the tracker and the decisions
        match_s = max(0.0, t3 - t2 - align_s - encode_s)
        self._record(frame, len(detections), t1 - t0, t2 - t1, align_s, encode_s, batch, match_s, t3 - t0)
        return decisions

    def _sample(
        self,
        recognizer: Recognizer,
        update: TrackUpdate,
        rgb: np.ndarray,
        ts: float,
        wall: datetime,
        index: GalleryIndex | None,
    ) -> tuple[float, float, int]:
        """Align, gate, encode (one batch) and match the faces the recognizer wants from this frame; returns the
        seconds spent aligning (with the gate) and encoding, and the batch size."""
        wanted = recognizer.observe(update, rgb, wall)
        if not wanted:
            return 0.0, 0.0, 0
        t0 = time.perf_counter()
        faces, chips, qualities = [], [], []
        for face in wanted:
            try:
                chip = self.pipeline.aligner.align(rgb, [face.detection])[0]
            except ImageError as exc:  # degenerate landmarks: this face only
                log.debug("camera %s track %d: cannot align (%s)", recognizer.camera, face.track_id, exc)
                continue
            quality = recognizer.assess(face.detection, chip)
            if not quality.accepted:
                if quality.reason is not None:
                    recognizer.reject(quality.reason)
                continue
            faces.append(face)
            chips.append(chip)
            qualities.append(quality)
        t1 = time.perf_counter()
        if not faces:
            return t1 - t0, 0.0, 0
        embeddings = self.pipeline.encoder.encode(np.stack(chips))
        t2 = time.perf_counter()
        usable = index if index is not None and index.templates else None
        matches = usable.search(embeddings, k=self.recognition_config.k) if usable is not None else None
        version = usable.version if usable is not None else 0
        recognizer.add_samples(faces, qualities, embeddings, matches, version, ts, rgb)
        return t1 - t0, t2 - t1, len(faces)

    def _record(
        self,
        frame: Frame,
        faces: int,
        detect_s: float,
        track_s: float,
        align_s: float,
        encode_s: float,
        batch: int,
        match_s: float,
        frame_s: float,
    ) -> None:
        now = time.monotonic()
        with self._lock:
            first = frame.camera not in self._camera_frames  # a new camera's first frame sets up its shapes
            self._frames += 1
            self._camera_frames[frame.camera] = self._camera_frames.get(frame.camera, 0) + 1
            self._faces += faces
            self._encodes += batch
            if faces:
                self._last_face = now
            self._live_tracks = sum(t.live for t in self._trackers.values())
            last = self._camera_last.get(frame.camera)
            if last is not None:
                interval = self._camera_interval.get(frame.camera)
                if interval is None:
                    interval = self._camera_interval[frame.camera] = LatencyEma(self.config.ema_alpha)
                interval.add(now - last)
            self._camera_last[frame.camera] = now
            if self._last_record is not None:
                self._interval.add(max(now - self._last_record, 1e-6))
            self._last_record = now
            if first:
                return
            self._ema["detect"].add(detect_s * 1e3)
            self._ema["track"].add(track_s * 1e3)
            if align_s:
                self._ema["align"].add(align_s * 1e3)
            if batch:
                self._ema["encode"].add(encode_s * 1e3)
                self._ema["batch"].add(batch)
            self._ema["match"].add(match_s * 1e3)
            self._ema["frame"].add(frame_s * 1e3)

    # --- helpers ----------------------------------------------------------------------------------------------------
    def _frame_ts(self, frame: Frame) -> float:
        """The frame's time on the configured clock (see WorkerConfig.clock)."""
        if self.config.clock == "capture" or frame.position_ms is None:
            return frame.captured_at
        position = frame.position_ms / 1000.0
        offset, last_position, last_ts = self._media.get(frame.camera, (0.0, -math.inf, -math.inf))
        if position < last_position:  # a looping file started again: its time goes on
            offset = last_ts + DEFAULT_FRAME_PERIOD_S - position
        ts = offset + position
        self._media[frame.camera] = (offset, position, ts)
        return ts

    def _now(self, camera: str) -> float:
        """Now on the configured clock: a file on the media clock stands still between its frames."""
        if self.config.clock == "media" and camera in self._media:
            return self._media[camera][2]
        return time.monotonic()

    def _per_camera(self, camera: str) -> tuple[Tracker, Recognizer]:
        tracker = self._trackers.get(camera)
        if tracker is None:
            tracker = Tracker(self.tracker_config, camera=camera)
            recognizer = Recognizer(
                camera,
                self.recognition_config,
                fingerprint=self._fingerprint,
                rule=self.rule,
                site_rules=self.site_rules,
            )
            with self._lock:
                self._trackers[camera] = tracker
                self._recognizers[camera] = recognizer
        return tracker, self._recognizers[camera]

    def _housekeeping(self, now: float, *, skip: str | None = None, force: bool = False) -> None:
        """Age out the tracks of cameras that deliver no frames, and time out their undecided tracks."""
        if not force and now - self._last_housekeeping < HOUSEKEEPING_INTERVAL_S:
            return
        self._last_housekeeping = now
        decisions: list[TrackDecision] = []
        for camera, tracker in list(self._trackers.items()):
            if camera == skip:
                continue
            try:
                at = self._now(camera)
                ended = tracker.expire(at)
                decisions += self._recognizers[camera].decide(ended, self.holder.current, at, _utc_now())
            except Exception:
                self._log_failure("housekeeping", f"camera {camera}: housekeeping failed")
        with self._lock:
            self._live_tracks = sum(t.live for t in self._trackers.values())
        self._deliver(decisions)

    def _flush(self) -> None:
        """End every live track and deliver the decisions (sources ended, or stopping)."""
        decisions: list[TrackDecision] = []
        for camera, tracker in list(self._trackers.items()):
            ended: Sequence[EndedTrack] = tracker.flush()
            try:
                at = self._now(camera)
                decisions += self._recognizers[camera].decide(ended, self.holder.current, at, _utc_now())
            except Exception:
                self._log_failure("flush", f"camera {camera}: deciding the last tracks failed")
        with self._lock:
            self._live_tracks = 0
        self._deliver(decisions)

    def _deliver(self, decisions: Sequence[TrackDecision]) -> None:
        for decision in decisions:
            try:
                self.on_decision(decision)
            except Exception:
                with self._lock:
                    self._callback_errors += 1
                self._log_failure("callback", f"camera {decision.camera} track {decision.track_id}: on_decision failed")

    def _log_failure(self, kind: str, what: str) -> None:
        """Log the exception being handled: with its traceback at most once per error_log_interval_s per kind of
        failure (a camera feeding garbage must not flood the log), at debug level in between."""
        now = time.monotonic()
        interval = self.config.error_log_interval_s
        if now - self._last_error_log.get(kind, -math.inf) >= interval:
            self._last_error_log[kind] = now
            log.exception("%s (the worker goes on; repeats are logged at debug level for %.0f s)", what, interval)
        else:
            log.debug("%s", what, exc_info=True)

    def _warm_up(self) -> None:
        """Run every model once on blank input (not measured): sessions allocate and tune on their first runs."""
        cfg = self.config
        started = time.perf_counter()
        try:
            blank = np.zeros((cfg.warmup_height, cfg.warmup_width, 3), dtype=np.uint8)
            self.pipeline.detect(blank)
            # a plausible face in the middle: loads the aligner's shape model and runs the warp once
            cx, cy, s = cfg.warmup_width / 2, cfg.warmup_height / 2, min(cfg.warmup_width, cfg.warmup_height) / 4
            face = Detection(
                bbox=(cx - s, cy - s, cx + s, cy + s),
                score=1.0,
                landmarks=(
                    (cx - 0.35 * s, cy - 0.2 * s),
                    (cx + 0.35 * s, cy - 0.2 * s),
                    (cx, cy + 0.15 * s),
                    (cx - 0.3 * s, cy + 0.5 * s),
                    (cx + 0.3 * s, cy + 0.5 * s),
                ),
            )
            self.pipeline.aligner.align(blank, [face])
            for n in range(1, self.recognition_config.max_encodes_per_frame + 1):
                size = self.pipeline.aligner.size
                self.pipeline.encoder.encode(np.zeros((n, size, size, 3), dtype=np.uint8))
        except Exception:
            log.exception("model warm-up failed; the first frames will show it")
            return
        log.info("models warmed up in %.2f s", time.perf_counter() - started)


def _value(ema: LatencyEma) -> float:
    return ema.ema_s or 0.0


def _rate(interval: LatencyEma) -> float:
    value = interval.ema_s
    return 1.0 / value if value else 0.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


# --- running a video end to end (tests, `edge-agent bench`) ----------------------------------------------------------
@dataclass(frozen=True)
class VideoRun:
    decisions: tuple[TrackDecision, ...]  # every decision, in order
    admitted: tuple[TrackDecision, ...]  # those the AttendanceGate let through (the events an agent would send)
    frames: int  # processed
    wall_s: float  # from the first frame's availability to the last decision
    stats: WorkerStats

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    def figures(self) -> dict[str, float]:
        """fps end to end and the stage latencies (ms), for a bench report."""
        s = self.stats
        return {
            "frames": self.frames,
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.fps, 2),
            "detect_ms": round(s.detect_ms, 2),
            "track_ms": round(s.track_ms, 3),
            "align_ms": round(s.align_ms, 2),
            "encode_ms": round(s.encode_ms, 2),
            "encode_batch": round(s.encode_batch, 2),
            "match_ms": round(s.match_ms, 3),
            "frame_ms": round(s.frame_ms, 2),
            "encodes": s.encodes,
            "faces": s.faces,
            "decisions": len(self.decisions),
            "events": len(self.admitted),
        }


def run_video(
    video: Path | str,
    pipeline: FacePipeline,
    index: GalleryIndex | None = None,
    *,
    camera: str = "bench",
    tracker: TrackerConfig | None = None,
    recognition: RecognitionConfig | None = None,
    rule: DecisionRule = DEFAULT_RULE,
    attendance: AttendanceConfig | None = None,
    worker: WorkerConfig | None = None,
    timeout_s: float = 600.0,
) -> VideoRun:
    """Run the worker over a video file as fast as it goes (every frame processed, `realtime=False`), with `index`
    as the gallery, through an AttendanceGate; the figures measure the pipeline, not the file's frame rate. The
    default worker config uses the media clock, so the decisions do not depend on this machine's speed."""
    cameras = CameraSet([CameraConfig(camera, str(video), realtime=False)])
    gate = AttendanceGate(attendance)
    decisions: list[TrackDecision] = []
    admitted: list[TrackDecision] = []

    def on_decision(decision: TrackDecision) -> None:
        decisions.append(decision)
        if gate.admit(decision):
            admitted.append(decision)

    runner = InferenceWorker(
        pipeline,
        cameras,
        IndexHolder(index),
        on_decision,
        tracker=tracker,
        recognition=recognition,
        rule=rule,
        config=worker or WorkerConfig(clock="media"),
    )
    runner.start()
    try:
        runner.wait_ready(timeout_s)
        started = time.monotonic()
        cameras.start()
        if not runner.wait_sources_ended(timeout_s):
            log.warning("run_video: %s not finished after %.0f s", video, timeout_s)
        wall = time.monotonic() - started
    finally:
        runner.stop()
        cameras.stop()
    stats = runner.stats()
    return VideoRun(tuple(decisions), tuple(admitted), stats.frames, wall, stats)
