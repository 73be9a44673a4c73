"""`edge-agent bench VIDEO`: how fast the edge pipeline runs on a video, and how late its events reach a subscriber.

Two measurements, one report:

1. **Throughput.** The video goes through the inference worker as fast as it goes (the file is read with
   `realtime=False`: every frame is processed, none dropped, the worker never waits for the file's clock) with the
   bench gallery in service: frames per second end to end (from the first frame's availability to the last
   decision), per-stage latency (detect, track, align, encode, match: the worker's EMAs, and for detect / align /
   encode and the whole per-frame cycle also p50 / p95 / max over every frame, timed around the models), faces and
   encodes per frame, peak RSS of this process.
2. **Event latency.** A complete `EdgeAgent` (outbox, snapshots, publisher, status, gallery sync, one MQTT
   connection) reads the same video at its own frame rate, like a camera (`realtime=True`), with the bench gallery
   loaded the way an edge starts with a broker down (the last good gallery, signed, saved in its state folder);
   a subscriber on the events topic records when each event arrives. For each event:
   - `vote_to_receipt`: the vote completes (the worker hands the decision to the agent) -> the subscriber has it;
     split into `vote_to_outbox` (attendance gate, snapshot, outbox commit) and `outbox_to_receipt` (publisher,
     broker, subscriber);
   - `decided_frame_to_receipt`: the capture of the frame that decided the vote (the event's `ts`) -> receipt;
   - `track_start_to_receipt`: the track's first frame -> receipt;
   - with ground truth (`<video>.truth.json`, written by `edge-agent make-video`): `first_frame_to_receipt`, the
     first frame showing the face -> receipt, and `first_frame_to_vote`.

   Clocks: the file is read in real time, so a frame at position p in the file is captured at t0 + p on the wall
   clock, t0 being when the file started (the earliest `wall_time - position` over the frames the worker took).
   The ground truth's first frame of a face is therefore a wall-clock moment, comparable with the subscriber's
   receive time (`time.time()`, the same clock as the frames' `wall_time`). Everything runs on this machine, so
   there is no clock skew between the edge and the subscriber.

Gallery: the people to enroll come from a folder of photos per person (`people`, default the shipped demo photos,
the ones `edge-agent make-video --people edge_agent/devtools/demo_people` draws from). With ground truth, the people the
video shows as enrolled are enrolled from their photos *except* the one(s) the video shows (as `make-video` and the
demo do); without it, everyone in the folder is enrolled from every photo. The gallery is built here with the same
pipeline the edge uses and signed with a throw-away key: the enrollment server's quality gates are not part of
what the bench measures. Unknown faces produce events too (`unknown_events`), so a video of nobody enrolled still
gives event latencies.

The agent is observed without changing it: the bench wraps the worker's `on_decision` callback (when the vote
completed, when the event was stored) and the camera set's `next_frame` (each frame's capture time and file
position).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.recognition.tracker import iou_matrix
from models.decision.rules import DecisionRule
from models.errors import ConfigError, FaceAttendError
from models.face.encoders import DEFAULT_ENCODER, DLIB_RESNET, check_choice, encoder_spec
from models.face.pipeline import FacePipeline, PipelineConfig

log = logging.getLogger(__name__)

SITE = "bench"
CAMERA = "bench"
TARGET_FPS = 15.0  # end to end, on the throughput pass
TARGET_EVENT_P95_MS = 500.0  # vote completed -> event at a subscriber, p95
MIN_IOU = 0.3  # a decision's face box must overlap a ground-truth face this much to be attributed to it
READY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30.0
GALLERY_VERSION = 1


class BenchInputError(ConfigError):
    """The bench cannot use its input (missing or unreadable video, bad people folder, bad options)."""


class BenchError(FaceAttendError):
    """A bench run failed (models never ready, the video never finished, the agent did not take the gallery)."""


@dataclass(frozen=True)
class BenchOptions:
    video: Path
    backend: str = "onnxruntime"
    threads: int | None = None
    seconds: float | None = None  # each pass stops after this many seconds (None: the whole video)
    people: Path | None = None  # photos to enroll, one folder per person (None: the shipped demo photos)
    broker: str | None = None  # an mqtt:// URL for the event pass (None: an embedded broker)
    pipeline_only: bool = False  # skip the event pass (no agent, no broker)
    timeout_s: float | None = None  # longest a pass may take (None: 3 x the video's length + 60 s)
    encoder: str = DEFAULT_ENCODER  # models/face/encoders.py
    accept_licence: str = ""  # the acknowledgement an encoder with a non-commercial licence needs

    def __post_init__(self) -> None:
        if self.seconds is not None and not (math.isfinite(self.seconds) and self.seconds > 0):
            raise BenchInputError(f"--seconds: must be a number > 0, got {self.seconds}")
        if self.threads is not None and self.threads < 1:
            raise BenchInputError(f"--threads: must be >= 1, got {self.threads}")
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise BenchInputError(f"--backend: expected onnxruntime or tensorrt, got {self.backend!r}")
        check_choice(self.encoder, "", self.accept_licence, lambda f: "--" + f.replace("_", "-"))

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            backend=self.backend, threads=self.threads, encoder=self.encoder, accept_licence=self.accept_licence
        )


# --- figures ---------------------------------------------------------------------------------------------------------
def summarise(values_ms: Iterable[float]) -> dict[str, float] | None:
    """n, p50, p95, max and mean of a list of milliseconds; None when empty."""
    a = np.asarray([v for v in values_ms if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return None
    return {
        "n": int(a.size),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "max": round(float(a.max()), 2),
        "mean": round(float(a.mean()), 2),
    }


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    frames: int  # as the container states it (0: unknown)
    truth: Any = None  # edge_agent.devtools.videogen.GroundTruth when a matching .truth.json lies beside the video

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps > 0 and self.frames > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
            "fps": round(self.fps, 3),
            "frames": self.frames,
            "duration_s": round(self.duration_s, 2),
            "ground_truth": self.truth is not None,
        }


@dataclass(frozen=True)
class Throughput:
    frames: int
    wall_s: float
    faces: int
    encodes: int
    encode_batch: float  # chips per encode (EMA)
    decisions: int
    known: int
    stages_ms: dict[str, dict[str, float]]
    peak_rss_mib: float

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        n = max(self.frames, 1)
        return {
            "frames": self.frames,
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.fps, 2),
            "faces_per_frame": round(self.faces / n, 3),
            "encodes_per_frame": round(self.encodes / n, 3),
            "encode_batch": round(self.encode_batch, 2),
            "decisions": self.decisions,
            "decisions_known": self.known,
            "decisions_unknown": self.decisions - self.known,
            "stages_ms": self.stages_ms,
            "peak_rss_mib": round(self.peak_rss_mib, 1),
        }


@dataclass(frozen=True)
class EventRecord:
    event_id: str
    seq: int
    track_id: int
    person_id: str | None
    truth_person: str | None  # whose face it was, from the ground truth (None: no truth, or not attributable)
    trigger: str
    samples: int
    latency_ms: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "seq": self.seq,
            "track_id": self.track_id,
            "person_id": self.person_id,
            "truth_person": self.truth_person,
            "trigger": self.trigger,
            "samples": self.samples,
            "latency_ms": self.latency_ms,
        }


LATENCIES = (
    "vote_to_receipt",
    "vote_to_outbox",
    "outbox_to_receipt",
    "decided_frame_to_receipt",
    "track_start_to_receipt",
    "first_frame_to_receipt",
    "first_frame_to_vote",
)


@dataclass(frozen=True)
class EventLatency:
    broker: str
    frames: int  # processed by the agent's worker
    wall_s: float
    frames_dropped: int  # the camera delivered them while the worker was busy (real time: the worker fell behind)
    stored: int  # events the agent stored
    events: tuple[EventRecord, ...]  # received by the subscriber, in order of arrival
    unmatched: int  # received events the probe saw no decision for (should be 0)
    people: dict[str, dict[str, Any]]  # per person in the ground truth
    problems: tuple[str, ...]

    def latency(self, name: str) -> dict[str, float] | None:
        return summarise(e.latency_ms[name] for e in self.events if e.latency_ms.get(name) is not None)  # type: ignore[misc]

    def to_json(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "frames": self.frames,
            "wall_s": round(self.wall_s, 3),
            "processed_fps": round(self.frames / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "frames_dropped": self.frames_dropped,
            "stored": self.stored,
            "received": len(self.events),
            "unmatched": self.unmatched,
            "latency_ms": {name: self.latency(name) for name in LATENCIES},
            "people": self.people,
            "problems": list(self.problems),
            "events": [e.to_json() for e in self.events],
        }


@dataclass(frozen=True)
class BenchReport:
    video: VideoInfo
    backend: str
    threads: int | None
    machine: dict[str, Any]
    gallery: dict[str, Any]
    throughput: Throughput
    events: EventLatency | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    encoder: str = DEFAULT_ENCODER

    @property
    def event_p95_ms(self) -> float | None:
        s = self.events.latency("vote_to_receipt") if self.events is not None else None
        return None if s is None else s["p95"]

    def targets(self) -> dict[str, dict[str, Any]]:
        p95 = self.event_p95_ms
        return {
            "fps": {
                "target": f">= {TARGET_FPS:g}",
                "value": round(self.throughput.fps, 2),
                "met": self.throughput.fps >= TARGET_FPS,
            },
            "event_latency_p95_ms": {
                "target": f"<= {TARGET_EVENT_P95_MS:g} (vote completed -> subscriber)",
                "value": p95,
                "met": None if p95 is None else p95 <= TARGET_EVENT_P95_MS,
            },
        }

    @property
    def ok(self) -> bool:
        """The ground-truth check of the event pass passed (targets are reported, not checked here)."""
        return self.events is None or not self.events.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "video": self.video.to_json(),
            "backend": self.backend,
            "encoder": self.encoder,
            "threads": self.threads,
            "machine": self.machine,
            "gallery": self.gallery,
            "throughput": self.throughput.to_json(),
            "events": None if self.events is None else self.events.to_json(),
            "targets": self.targets(),
            "ok": self.ok,
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        v, t = self.video, self.throughput
        lines = [
            f"video {v.path}: {v.width}x{v.height} at {v.fps:g} fps, {v.frames} frames"
            + (" (with ground truth)" if v.truth is not None else " (no ground truth)"),
            f"encoder {self.encoder}, backend {self.backend}, threads {self.threads or 'default'}; "
            f"{self.machine['cpus']} CPUs, "
            f"load {self.machine['load_before']} before, {self.machine['load_after']} after",
            f"gallery: {self.gallery['people']} people, {self.gallery['templates']} templates",
            "",
            f"throughput (every frame, as fast as it goes): {t.frames} frames in {t.wall_s:.2f} s = {t.fps:.1f} fps; "
            f"{t.faces / max(t.frames, 1):.2f} faces/frame, {t.encodes / max(t.frames, 1):.2f} encodes/frame; "
            f"peak RSS {t.peak_rss_mib:.0f} MiB",
        ]
        for stage, fig in t.stages_ms.items():
            extra = "" if "p50" not in fig else f"  p50 {fig['p50']:.2f}  p95 {fig['p95']:.2f}  max {fig['max']:.2f}"
            ema = f"ema {fig['ema']:.2f}" if "ema" in fig else " " * 8
            lines.append(f"  {stage:<7s} ms  {ema}{extra}")
        if self.events is not None:
            e = self.events
            lines += [
                "",
                f"event latency (the agent reading the video in real time, broker {e.broker}): {e.frames} frames "
                f"processed, {e.frames_dropped} dropped; {e.stored} events stored, {len(e.events)} received",
            ]
            for name in LATENCIES:
                s = e.latency(name)
                if s is not None:
                    lines.append(
                        f"  {name:<26s} p50 {s['p50']:8.1f}  p95 {s['p95']:8.1f}  max {s['max']:8.1f} ms  (n={s['n']})"
                    )
            for person, info in e.people.items():
                lat = info.get("first_frame_to_receipt_ms")
                lines.append(
                    f"  {person:<24s} {'enrolled' if info['enrolled'] else 'stranger':<8s} "
                    f"events {info['events']}, recognised as {info['recognised_as'] or '-'}"
                    + ("" if lat is None else f", first frame -> receipt {lat:.0f} ms")
                )
            for problem in e.problems:
                lines.append(f"  problem: {problem}")
        lines.append("")
        for name, target in self.targets().items():
            met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
            lines.append(f"target {name}: {target['value']} (target {target['target']}): {met}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- input -----------------------------------------------------------------------------------------------------------
def probe_video(path: Path, notes: list[str]) -> VideoInfo:
    """Check that `path` is a video OpenCV decodes; its size, rate, length and ground truth (if any)."""
    from edge_agent.devtools.videogen import GroundTruth, truth_path

    if not path.exists():
        raise BenchInputError(f"{path}: no such file")
    if not path.is_file():
        raise BenchInputError(f"{path}: not a file (expected a video file)")
    cap = cv2.VideoCapture(str(path))
    try:
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok or first is None:
            raise BenchInputError(f"{path}: not a video OpenCV can decode (no frame could be read)")
        second_ok = cap.grab()
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        cap.release()
    if not second_ok:
        raise BenchInputError(f"{path}: a single image, not a video (only one frame could be read)")
    if not 0 < fps < 1000:
        raise BenchInputError(f"{path}: the video does not state a usable frame rate ({fps})")
    height, width = first.shape[:2]
    truth = None
    tpath = truth_path(path)
    if tpath.is_file():
        truth = GroundTruth.load(tpath)
        if (truth.width, truth.height) != (width, height) or abs(truth.fps - fps) > 0.01:
            notes.append(
                f"{tpath.name} describes a {truth.width}x{truth.height} video at {truth.fps:g} fps, the file is "
                f"{width}x{height} at {fps:g} fps: ground truth ignored"
            )
            truth = None
    else:
        notes.append(f"no ground truth ({tpath.name}): first-frame latencies and the recognition check are left out")
    return VideoInfo(path, width, height, fps, frames, truth)


def enrollment_plan(
    people: dict[str, tuple[Path, ...]], truth: Any, notes: list[str]
) -> tuple[dict[str, tuple[Path, ...]], set[str]]:
    """person -> photos to enroll, and the people the video shows enrolled (see the module docstring)."""
    if truth is None:
        return dict(people), set(people)
    shown: dict[str, set[str]] = {}
    for a in truth.appearances:
        if a.enrolled:
            shown.setdefault(a.person, set()).add(Path(a.photo).name)
    plan: dict[str, tuple[Path, ...]] = {}
    missing: list[str] = []
    for person in sorted(shown):
        photos = tuple(p for p in people.get(person, ()) if p.name not in shown[person])
        if photos:
            plan[person] = photos
        else:
            missing.append(person)
    if missing:
        notes.append(
            f"not enrolled, no photo of them besides the one the video shows in the people folder (is it the folder "
            f"the video was made from?): {', '.join(missing)}"
        )
    return plan, set(plan)


def build_gallery(
    pipeline: FacePipeline, plan: dict[str, tuple[Path, ...]], notes: list[str]
) -> Any:  # models.contract.gallery.Gallery | None
    """Embed every enrollment photo (the largest face of each) into a contract Gallery; None when nobody has one."""
    from models.contract.gallery import Gallery, GalleryPerson
    from models.imageio import load_image

    vectors: list[np.ndarray] = []
    labels: list[int] = []
    persons: list[GalleryPerson] = []
    skipped: list[str] = []
    for person, photos in plan.items():
        rows = []
        for photo in photos:
            try:
                faces = pipeline.embed(load_image(photo))
            except FaceAttendError as exc:
                skipped.append(f"{photo.name} of {person} ({exc})")
                continue
            if not faces:
                skipped.append(f"{photo.name} of {person} (no face)")
                continue
            rows.append(max(faces, key=lambda f: f.detection.width * f.detection.height).embedding)
        if rows:
            vectors += rows
            labels += [len(persons)] * len(rows)
            persons.append(GalleryPerson(person, person.replace("_", " ")))
    if skipped:
        notes.append("enrollment photos left out: " + "; ".join(skipped))
    if not persons:
        notes.append("nobody enrolled: every face is an unknown visitor")
        return None
    return Gallery(
        SITE,
        GALLERY_VERSION,
        pipeline.fingerprint,
        "euclidean",
        "float32",
        np.stack(vectors).astype(np.float32),
        np.array(labels, dtype=np.int32),
        tuple(persons),
    )


# --- pass 1: throughput ----------------------------------------------------------------------------------------------
class _StageClock:
    """Per-frame timings of the model calls the worker makes (detect once per frame, align per face, encode once per
    frame that has chips); recorded only once armed (after the warm-up), the first frame left out as the worker
    does (it sets up the shapes)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {"detect": [], "align": [], "encode": [], "cycle": []}
        self._armed = False
        self._frames = 0
        self._frame_start: float | None = None
        self._align = 0.0

    def arm(self) -> None:
        self._armed = True

    def frame_started(self, now: float) -> None:
        if not self._armed:
            return
        self._close_frame(now)
        self._frames += 1
        self._frame_start = now

    def finish(self) -> None:
        """The last frame has no next one: its align figure is taken, its cycle (unknown) is not."""
        if self._frames > 1 and self._align:
            self.samples["align"].append(self._align * 1e3)
        self._align = 0.0

    def add(self, stage: str, seconds: float) -> None:
        if not self._armed or self._frames <= 1:
            return
        if stage == "align":
            self._align += seconds
        else:
            self.samples[stage].append(seconds * 1e3)

    def _close_frame(self, now: float) -> None:
        if self._frames > 1 and self._frame_start is not None:
            self.samples["cycle"].append((now - self._frame_start) * 1e3)
            if self._align:
                self.samples["align"].append(self._align * 1e3)
        self._align = 0.0


class _TimedAligner:
    def __init__(self, inner: Any, clock: _StageClock) -> None:
        self._inner, self._clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def align(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner.align(*args, **kwargs)
        finally:
            self._clock.add("align", time.perf_counter() - t0)


class _TimedEncoder:
    def __init__(self, inner: Any, clock: _StageClock) -> None:
        self._inner, self._clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner.encode(*args, **kwargs)
        finally:
            self._clock.add("encode", time.perf_counter() - t0)


class _TimedPipeline(FacePipeline):
    """The same models, timed; closing it leaves the models to their owner."""

    def __init__(self, inner: FacePipeline, clock: _StageClock) -> None:
        super().__init__(inner.detector, _TimedEncoder(inner.encoder, clock), _TimedAligner(inner.aligner, clock))  # type: ignore[arg-type]
        self._clock = clock

    def detect(self, image: np.ndarray) -> Any:
        t0 = time.perf_counter()
        self._clock.frame_started(t0)
        try:
            return super().detect(image)
        finally:
            self._clock.add("detect", time.perf_counter() - t0)

    def close(self) -> None:
        pass


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_throughput(
    video: Path,
    pipeline: FacePipeline,
    index: Any,
    *,
    seconds: float | None,
    timeout_s: float,
    rule: DecisionRule = DLIB_RESNET.default_decision,
) -> Throughput:
    """Pass 1 (see the module docstring)."""
    from edge_agent.capture import CameraConfig, CameraSet
    from edge_agent.gallery.index import IndexHolder
    from edge_agent.recognition.recognizer import TrackDecision
    from edge_agent.recognition.worker import InferenceWorker, WorkerConfig

    clock = _StageClock()
    cameras = CameraSet([CameraConfig(CAMERA, str(video), realtime=False)])
    decisions: list[TrackDecision] = []
    worker = InferenceWorker(
        _TimedPipeline(pipeline, clock),
        cameras,
        IndexHolder(index),
        decisions.append,
        config=WorkerConfig(clock="media"),  # decisions in the video's own time, whatever this machine's speed
        rule=rule,
    )
    worker.start()
    try:
        if not worker.wait_ready(READY_TIMEOUT_S):
            raise BenchError(f"the models were not ready within {READY_TIMEOUT_S:.0f} s")
        clock.arm()
        log.info("bench: throughput pass over %s (every frame, as fast as it goes)", video)
        started = time.monotonic()
        cameras.start()
        _wait_video(worker.wait_sources_ended, cameras.stop, started, seconds, timeout_s)
        wall = time.monotonic() - started
    finally:
        worker.stop()
        cameras.stop()
    clock.finish()
    s = worker.stats()
    stages: dict[str, dict[str, float]] = {}
    emas = {
        "detect": s.detect_ms,
        "track": s.track_ms,
        "align": s.align_ms,
        "encode": s.encode_ms,
        "match": s.match_ms,
        "frame": s.frame_ms,
    }
    for stage, ema in emas.items():
        stages[stage] = {"ema": round(ema, 3)}
        spread = summarise(clock.samples.get(stage, ()))
        if spread is not None:
            stages[stage].update(spread)
    cycle = summarise(clock.samples["cycle"])
    if cycle is not None:
        stages["cycle"] = cycle  # detect call to the next: the worker's whole turn per frame, reading included
    return Throughput(
        frames=s.frames,
        wall_s=wall,
        faces=s.faces,
        encodes=s.encodes,
        encode_batch=s.encode_batch,
        decisions=len(decisions),
        known=sum(1 for d in decisions if d.known),
        stages_ms=stages,
        peak_rss_mib=_peak_rss_mib(),
    )


def _wait_video(
    finished: Callable[[float], bool],
    stop_cameras: Callable[[], None],
    started: float,
    seconds: float | None,
    timeout_s: float,
) -> None:
    """Until every camera finished and its tracks were decided; the cameras are stopped after `seconds`."""
    stopped = False
    while not finished(0.1):
        elapsed = time.monotonic() - started
        if seconds is not None and elapsed >= seconds and not stopped:
            stop_cameras()  # the worker then decides the live tracks and reports the sources ended
            stopped = True
        if elapsed > timeout_s:
            raise BenchError(f"the video was not finished after {timeout_s:.0f} s")


# --- pass 2: event latency -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbedDecision:
    """What the probe keeps of a decision (not its frame)."""

    person_id: str | None
    candidate: str | None  # the nearest identity, accepted or not
    reason: str  # the recognizer's DecisionReason
    trigger: str
    samples: int
    vote_share: float
    bbox: tuple[float, float, float, float]
    frame_ts: float
    first_seen_ts: float
    first_seen_wall: float
    decided_wall: float
    voted_at: float  # time.time() when the worker handed the decision to the agent
    stored_at: float  # time.time() when the agent's callback returned (event in the outbox, or refused)


class AgentProbe:
    """Wraps the agent's decision callback and frame source to time them (see the module docstring), and to
    attribute each decision to the ground truth's face (`owner_of`); `frames` counts the frames the worker took."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decided: dict[tuple[str, int], ProbedDecision] = {}
        self.positions: dict[float, float] = {}  # frame captured_at (the worker's clock) -> position in the file (s)
        self.origin: float | None = None  # wall time of position 0 (earliest wall_time - position)
        self.media_clock = False
        self.frames = 0
        self.position = 0.0  # the latest file position the worker took (s)

    def install(self, agent: Any) -> None:
        # on the media clock a decision's frame_ts is the frame's position in the file (one file, never looping)
        self.media_clock = agent.worker.config.clock == "media"
        on_decision = agent.worker.on_decision
        next_frame = agent.cameras.next_frame

        def decided(d: Any) -> None:
            voted = time.time()
            try:
                on_decision(d)
            finally:
                record = ProbedDecision(
                    person_id=d.person_id,
                    candidate=d.candidate,
                    reason=getattr(d.reason, "value", str(d.reason)),
                    trigger=getattr(d.trigger, "value", str(d.trigger)),
                    samples=d.samples,
                    vote_share=d.vote_share,
                    bbox=tuple(d.bbox),  # type: ignore[arg-type]
                    frame_ts=d.frame_ts,
                    first_seen_ts=d.first_seen_ts,
                    first_seen_wall=d.first_seen_wall.timestamp(),
                    decided_wall=d.decided_wall.timestamp(),
                    voted_at=voted,
                    stored_at=time.time(),
                )
                with self._lock:
                    self.decided[(d.camera, d.track_id)] = record

        def frame(timeout: float) -> Any:
            f = next_frame(timeout)
            if f is not None and f.position_ms is not None:
                position = f.position_ms / 1000.0
                origin = f.wall_time.timestamp() - position
                with self._lock:
                    self.frames += 1
                    self.position = max(self.position, position)
                    self.positions[f.captured_at] = position
                    if self.origin is None or origin < self.origin:
                        self.origin = origin
            return f

        agent.worker.on_decision = decided
        agent.cameras.next_frame = frame


def owner_of(d: ProbedDecision, probe: AgentProbe, truth: Any) -> Any:
    """The ground-truth appearance whose face the decision's best box covers, on its best frame; None if none."""
    position = d.frame_ts if probe.media_clock else probe.positions.get(d.frame_ts)
    if truth is None or position is None:
        return None
    frame = round(position * truth.fps)
    best, who = 0.0, None
    for index in (frame - 1, frame, frame + 1):
        for appearance, box in truth.faces_at(index):
            overlap = float(iou_matrix(np.array([d.bbox]), np.array([box.box]))[0, 0])
            if overlap > best:
                best, who = overlap, appearance
    return who if best >= MIN_IOU else None


def _ms(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round((later - earlier) * 1e3, 2)


def measure_event_latency(
    video: VideoInfo,
    gallery: Any,
    enrolled: set[str],
    options: BenchOptions,
    workdir: Path,
    broker_url: str,
    broker_label: str,
    *,
    timeout_s: float,
) -> EventLatency:
    """Pass 2 (see the module docstring)."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import config_from_dict
    from edge_agent.devtools.demo import Consumer
    from edge_agent.gallery.index import GalleryStore
    from models.contract.events import AttendanceEvent
    from models.contract.gallery import build_publication
    from models.contract.signing import Signer, Verifier

    device = f"bench-{secrets.token_hex(3)}"  # its own topics, even on a shared broker
    public_key = workdir / "gallery-signing.pub.pem"
    signer = Signer.generate()
    signer.save_public(public_key)
    models: dict[str, Any] = {
        "backend": options.backend,
        "encoder": options.encoder,
        "accept_licence": options.accept_licence,
    }
    if options.threads is not None:
        models["threads"] = options.threads
    cfg = config_from_dict(
        {
            "device_id": device,
            "site": SITE,
            "state_dir": str(workdir / "edge"),
            "mqtt": {"url": broker_url},
            "gallery": {"public_key": str(public_key)},
            "cameras": [{"name": CAMERA, "source": str(video.path), "realtime": True}],
            "models": models,
            "attendance": {"unknown_events": True},
            "snapshots": {"mode": "face"},
        },
        workdir,
    )
    if gallery is not None:  # the edge's last good gallery, as if it had been received and verified before
        manifest, chunks = build_publication(gallery, signer)
        cfg.gallery_dir.mkdir(parents=True, exist_ok=True)
        store = GalleryStore(cfg.gallery_dir, Verifier.from_pem_file(public_key), gallery.fingerprint, SITE)
        store.save(manifest.to_json(), b"".join(chunks))

    received: list[tuple[AttendanceEvent, float]] = []
    lock = threading.Lock()

    def on_event(event: AttendanceEvent, at: float) -> None:
        if event.device_id == device:
            with lock:
                received.append((event, at))

    consumer = Consumer(broker_url, on_event)
    agent = EdgeAgent(cfg)
    probe = AgentProbe()
    try:
        consumer.start()
        agent.start()
        if gallery is not None and agent.gallery_version() != gallery.version:
            raise BenchError("the agent did not put the bench gallery in service (see the log)")
        probe.install(agent)
        log.info("bench: event pass over %s in real time, device %s", video.path, device)
        started = time.monotonic()
        agent.start_cameras()
        _wait_video(agent.cameras_finished, agent.cameras.stop, started, options.seconds, timeout_s)
        wall = time.monotonic() - started
        stats = agent.worker.stats()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        stored = int(agent.health()["events"]["stored_total"])
        while time.monotonic() < deadline:
            with lock:
                got = len(received)
            if agent.outbox_depth() == 0 and got >= stored:
                break
            time.sleep(0.05)
    finally:
        agent.stop()
        consumer.stop()

    truth = video.truth
    records: list[EventRecord] = []
    unmatched = 0
    owners: dict[str, list[tuple[AttendanceEvent, dict[str, float | None]]]] = {}
    for event, at in received:
        d = probe.decided.get((event.camera, event.track_id))
        if d is None:
            unmatched += 1
            continue
        appearance = owner_of(d, probe, truth)
        first_frame = (
            None if appearance is None or probe.origin is None else probe.origin + appearance.start_frame / truth.fps
        )
        latency = {
            "vote_to_receipt": _ms(at, d.voted_at),
            "vote_to_outbox": _ms(d.stored_at, d.voted_at),
            "outbox_to_receipt": _ms(at, d.stored_at),
            "decided_frame_to_receipt": _ms(at, d.decided_wall),
            "track_start_to_receipt": _ms(at, d.first_seen_wall),
            "first_frame_to_receipt": _ms(at, first_frame),
            "first_frame_to_vote": _ms(d.voted_at, first_frame),
        }
        person = None if appearance is None else appearance.person
        records.append(
            EventRecord(
                event.event_id, event.seq, event.track_id, event.person_id, person, d.trigger, d.samples, latency
            )
        )
        if person is not None:
            owners.setdefault(person, []).append((event, latency))

    people: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    if truth is not None:
        # with --seconds, only the people who came and went before the cameras were stopped
        seen_until = options.seconds * video.fps if options.seconds is not None else math.inf
        for a in sorted(truth.appearances, key=lambda a: a.start_frame):
            if a.person in people or a.end_frame > seen_until:
                continue
            mine = owners.get(a.person, [])
            names = sorted({e.person_id for e, _ in mine if e.person_id})
            known = [(e, lat) for e, lat in mine if e.person_id == a.person]
            is_enrolled = a.enrolled and a.person in enrolled
            relevant = known if is_enrolled else mine  # a stranger's events are the unknown-visitor ones
            people[a.person] = {
                "enrolled": is_enrolled,
                "events": len(mine),
                "recognised_as": ", ".join(names) or None,
                # the person's first event (in order of arrival) is the one that counts
                "first_frame_to_receipt_ms": relevant[0][1]["first_frame_to_receipt"] if relevant else None,
                "vote_to_receipt_ms": relevant[0][1]["vote_to_receipt"] if relevant else None,
            }
            wrong = [n for n in names if n != a.person]
            if wrong:
                problems.append(f"{a.person}: recognised as {', '.join(wrong)}")
            if is_enrolled and not known:
                problems.append(f"{a.person} (enrolled): no event recognising them")
    if unmatched:
        problems.append(f"{unmatched} received event(s) without a decision the bench saw")
    return EventLatency(
        broker=broker_label,
        frames=stats.frames,
        wall_s=wall,
        frames_dropped=stats.frames_dropped,
        stored=stored,
        events=tuple(records),
        unmatched=unmatched,
        people=people,
        problems=tuple(problems),
    )


# --- the whole bench -------------------------------------------------------------------------------------------------
def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_bench(options: BenchOptions) -> BenchReport:
    from edge_agent.devtools.demo import DEMO_PEOPLE, broker_url_for, workdir_for
    from edge_agent.devtools.videogen import load_people
    from edge_agent.gallery.index import GalleryIndex
    from models.contract.mqtt_link import MqttConfig

    notes: list[str] = []
    load_before = _load()
    video = probe_video(options.video, notes)
    people = load_people(options.people or DEMO_PEOPLE)
    plan, enrolled = enrollment_plan(people, video.truth, notes)
    timeout_s = options.timeout_s or (3 * video.duration_s + 60.0 if video.duration_s else 600.0)
    if options.seconds is not None:
        timeout_s = min(timeout_s, 3 * options.seconds + 60.0)
    # a missing runtime (TensorRT without a GPU) fails here, before anything else is started
    pipeline = FacePipeline.create(options.pipeline_config())
    try:
        gallery = build_gallery(pipeline, plan, notes)
        if gallery is not None:
            log.info("bench: gallery of %d people, %d templates", len(gallery.people), gallery.count)
        index = GalleryIndex.build(gallery) if gallery is not None else None
        throughput = measure_throughput(
            options.video,
            pipeline,
            index,
            seconds=options.seconds,
            timeout_s=timeout_s,
            rule=encoder_spec(options.encoder).default_decision,
        )
    finally:
        pipeline.close()
    events = None
    if not options.pipeline_only:
        if options.broker is None:
            label = "embedded"
        else:
            mqtt = MqttConfig.from_url(options.broker)
            label = f"{'mqtts' if mqtt.tls else 'mqtt'}://{mqtt.host}:{mqtt.port}"
        with workdir_for(None) as workdir, broker_url_for(options.broker) as url:
            events = measure_event_latency(video, gallery, enrolled, options, workdir, url, label, timeout_s=timeout_s)
        if options.broker is None:
            notes.append("the embedded broker and the subscriber run in this process, beside the agent")
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "processor": platform.machine(),
        "load_before": load_before,
        "load_after": _load(),
    }
    return BenchReport(
        video=video,
        backend=options.backend,
        threads=options.threads,
        machine=machine,
        gallery={
            "people": 0 if gallery is None else len(gallery.people),
            "templates": 0 if gallery is None else gallery.count,
        },
        throughput=throughput,
        events=events,
        notes=tuple(notes),
        encoder=options.encoder,
    )
