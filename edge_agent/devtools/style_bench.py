"""Does the offline style worker slow recognition? The inference worker (edge_agent/recognition/worker.py) runs over a
generated door video (edge_agent/devtools/videogen.py, real face photos) with and without the style worker painting
snapshots beside it, in interleaved rounds (a shared machine's noise hits every condition alike); the medians
are printed as one JSON object.

    python -m edge_agent.devtools.style_bench [--model mosaic.onnx] [--rounds 3] [--seconds 12] [--faces DIR]

Two scenarios:

- `throughput`: every frame as fast as the pipeline goes (the door never idle), the style worker forced to paint
  all the time (`is_idle` always true: the worst case the gating never allows). Conditions: `off`; the worker at
  SCHED_IDLE (the default) and at nice 19; and, as the reference for what the priority buys, the same
  stylisation loop in a plain thread at normal priority.
- `camera`: frames at the video's own rate, like a live camera; the style worker gated the way the agent gates it
  (`InferenceWorker.idle().quiet_for(idle_after_s)`): it paints in the gaps between visitors. Figures: fps
  processed, frames the worker had to drop, frame latency.

Without --model an untrained network of the default architecture is exported (needs torch; speed depends only on
the architecture); the style worker paints at `--max-side` with one ONNX Runtime thread, as configured by default.

The demo's style without files (no painting needed), trained on a desktop and copied to the door:

    model-tool train-style --style procedural:mosaic --skimage-samples --iterations 400 --size 128 \\
        --check-iterations 100 --onnx mosaic.onnx --grid mosaic-heldout.png
    # 2 min 50 s on 2 CPU cores. The held-out verdict (printed, and kept in the ONNX metadata) says
    # UNDERTRAINED, and it is: at 400 CPU steps the network paints the mosaic's palette and lead lines over
    # everything and loses the face (J 1.56x the optimiser's); a usable model needs thousands of steps on a
    # GPU. Any image works as a style too: --style my_picture.jpg

and in the agent's config:

    style:
      enabled: true
      styles: [{name: mosaic, model: mosaic.onnx}]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.capture import CameraConfig, CameraSet
from edge_agent.delivery.snapshots import SnapshotConfig, SnapshotStore
from edge_agent.devtools.videogen import Appearance, VideoSpec, generate_video, load_people
from edge_agent.gallery.index import IndexHolder
from edge_agent.recognition.worker import InferenceWorker, WorkerConfig
from edge_agent.style.worker import StyleConfig, StyleSpec, StyleWorker
from models.errors import FaceAttendError, StyleError
from models.face.pipeline import FacePipeline, PipelineConfig
from models.imageio import load_image

log = logging.getLogger("style-bench")

DEFAULT_FACES = Path(__file__).with_name("demo_people")


def make_video(faces: Path, out: Path, seconds: float, *, fps: float = 15.0, seed: int = 0) -> Path:
    """Visitors one after another (2.5 s each, 1.5 s gaps without faces), 640x480."""
    people = load_people(faces)
    names = sorted(people)
    rng = np.random.default_rng(seed)
    appearances, t, i = [], 0.3, 0
    while t + 2.5 <= seconds:
        name = names[i % len(names)]
        photo = people[name][int(rng.integers(len(people[name])))]
        appearances.append(Appearance(name, photo, round(t, 3), round(t + 2.5, 3), enrolled=False))
        t += 4.0
        i += 1
    spec = VideoSpec(tuple(appearances), fps=fps, seed=seed, duration_s=seconds)
    generate_video(spec, out)
    return out


def make_snapshots(faces: Path, root: Path, pipeline: FacePipeline, count: int) -> list[tuple[str, str]]:
    """`count` face snapshots (mode face, as the agent stores them) of real photos; (event_id, ref) each."""
    store = SnapshotStore(SnapshotConfig(dir=root, mode="face"))
    photos = sorted(p for p in faces.rglob("*.jpg"))
    crops: list[tuple[np.ndarray, tuple[float, float, float, float]]] = []
    for photo in photos[:40]:
        image = load_image(photo)
        found = pipeline.detect(image)
        if found:
            crops.append((image, max(found, key=lambda d: d.width * d.height).bbox))
    if not crops:
        raise StyleError(f"no face found in the photos under {faces}")
    out = []
    for i in range(count):
        image, box = crops[i % len(crops)]
        event_id = str(uuid.uuid4())
        ref = store.save(event_id, image, box)
        if ref is not None:
            out.append((event_id, ref))
    return out


def untrained_model(out: Path) -> Path:
    try:
        from models.style.export import export_onnx
        from models.style.runtime import StyleModelInfo
        from models.style.transformer import TransformerConfig, TransformerNet
    except ImportError as exc:
        raise StyleError("without --model the bench exports an untrained network, which needs torch") from exc
    config = TransformerConfig()
    info = StyleModelInfo("untrained (architecture only)", "", 0, config.to_json(), {})
    out.write_bytes(export_onnx(TransformerNet(config), info))
    return out


class _PlainLoop:
    """The reference: the same stylisation, in a thread left at normal priority."""

    def __init__(self, model: Path, root: Path, refs: list[tuple[str, str]], max_side: int) -> None:
        from models.style.runtime import Stylizer

        self._stylizer = Stylizer.from_onnx(model, threads=1, max_side=max_side)
        self._images = [load_image(root / ref) for _, ref in refs[:20]]
        self._stop = threading.Event()
        self.painted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stylizer.stylize_rgb(self._images[self.painted % len(self._images)])
            self.painted += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._stylizer.close()


def run_once(
    video: Path,
    pipeline: FacePipeline,
    *,
    realtime: bool,
    style: Callable[[InferenceWorker], Any] | None,
) -> dict[str, float]:
    """One pass over the video; `style(worker)` starts whatever runs beside it and returns it (with a `stop()`
    and a count of painted images)."""
    cameras = CameraSet([CameraConfig("bench", str(video), realtime=realtime)])
    worker = InferenceWorker(pipeline, cameras, IndexHolder(None), lambda d: None, config=WorkerConfig(clock="media"))
    worker.start()
    side = None
    try:
        if not worker.wait_ready(120):
            raise StyleError("the inference worker did not warm up within 120 s")
        if style is not None:
            side = style(worker)
        started = time.monotonic()
        before = _painted(side)
        cameras.start()
        worker.wait_sources_ended(600)
        wall = time.monotonic() - started
        painted = _painted(side) - before
    finally:
        worker.stop()
        cameras.stop()
        if side is not None:
            side.stop()
    stats = worker.stats()
    return {
        "fps": stats.frames / wall if wall > 0 else 0.0,
        "frame_ms": stats.frame_ms,
        "detect_ms": stats.detect_ms,
        "dropped": float(stats.frames_dropped),
        "frames": float(stats.frames),
        "painted": float(painted),
    }


def _painted(side: Any) -> int:
    if side is None:
        return 0
    if isinstance(side, StyleWorker):
        return side.stats().stylized
    return int(side.painted)


def run_loop(frames: list[np.ndarray], pipeline: FacePipeline, seconds: float, style: Any) -> dict[str, float]:
    """The detect + align + encode loop on decoded frames (no camera, no tracker), timed frame by frame."""
    side = style(None) if style is not None else None
    times: list[float] = []
    try:
        before = _painted(side)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            pipeline.embed(frames[len(times) % len(frames)])
            times.append((time.perf_counter() - t0) * 1e3)
        painted = _painted(side) - before
    finally:
        if side is not None:
            side.stop()
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {
        "fps": 1e3 / float(np.mean(times)),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "frames": float(len(times)),
        "painted": float(painted),
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    faces = Path(args.faces)
    with tempfile.TemporaryDirectory(prefix="style-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.model) if args.model else untrained_model(tmp / "untrained.onnx")
        pipeline = FacePipeline.create(PipelineConfig(backend=args.backend))
        try:
            video = make_video(faces, tmp / "door.avi", args.seconds)
            frames = _decoded(video)
            snap_root = tmp / "snapshots"
            refs = make_snapshots(faces, snap_root, pipeline, args.snapshots)
            store = SnapshotStore(SnapshotConfig(dir=snap_root, mode="face"))
            runs = 0

            def style_worker(priority: str, isolation: str, gated: bool) -> Callable[[Any], StyleWorker]:
                def start(inference: InferenceWorker | None) -> StyleWorker:
                    nonlocal runs
                    runs += 1
                    config = StyleConfig(
                        enabled=True,
                        styles=(StyleSpec("bench", model),),
                        queue=tmp / f"queue-{runs}.db",
                        max_side=args.max_side,
                        max_queue=len(refs),
                        idle_after_s=args.idle_after_s,
                        priority=priority,  # type: ignore[arg-type]
                        isolation=isolation,  # type: ignore[arg-type]
                    )
                    if gated and inference is not None:
                        is_idle = lambda: inference.idle().quiet_for(args.idle_after_s)  # noqa: E731
                    else:
                        is_idle = lambda: True  # noqa: E731
                    worker = StyleWorker(
                        config, store, is_idle, lambda m: None, device_id="bench", site="bench", backend=args.backend
                    )
                    for event_id, ref in refs:
                        worker.enqueue(event_id, ref)
                    worker.start()
                    deadline = time.monotonic() + 120
                    # painting already: the comparison starts with the style model loaded and running
                    while worker.stats().stylized < (0 if gated else 1):
                        if time.monotonic() > deadline or not worker.stats().running:
                            raise StyleError(f"the style worker did not start painting: {worker.stats()}")
                        time.sleep(0.02)
                    return worker

                return start

            def plain(_inference: Any) -> _PlainLoop:
                loop = _PlainLoop(model, snap_root, refs, args.max_side)
                loop.start()
                return loop

            always = {
                "off": None,
                "process_sched_idle": style_worker("idle", "process", False),
                "process_nice19": style_worker("nice", "process", False),
                "thread_sched_idle": style_worker("idle", "thread", False),
                "plain_thread_normal_priority": plain,
            }
            scenarios: dict[str, dict[str, Any]] = {
                "pipeline_loop": always,
                "throughput": always,
                "camera": {"off": None, "process_sched_idle_gated": style_worker("idle", "process", True)},
            }
            results: dict[str, dict[str, list[dict[str, float]]]] = {
                s: {c: [] for c in conds} for s, conds in scenarios.items()
            }
            for r in range(args.rounds):
                for scenario, conditions in scenarios.items():
                    for name, style in conditions.items():
                        if scenario == "pipeline_loop":
                            figures = run_loop(frames, pipeline, args.loop_seconds, style)
                        else:
                            figures = run_once(video, pipeline, realtime=scenario == "camera", style=style)
                        results[scenario][name].append(figures)
                        log.info("round %d %s %s: %s", r + 1, scenario, name, _rounded(figures))
        finally:
            pipeline.close()
    summary: dict[str, Any] = {
        "machine_cpus": _cpus(),
        "backend": args.backend,
        "video": f"640x480, {args.seconds:g} s at 15 fps, visitors 2.5 s each with 1.5 s gaps",
        "style": {
            "model": args.model or "untrained default architecture (width 16, 5 residual blocks)",
            "max_side": args.max_side,
            "threads": 1,
            "snapshots": "face crops of real photos",
        },
        "rounds": args.rounds,
        "median_of_rounds": True,
    }
    for scenario, conditions in results.items():
        summary[scenario] = {
            name: {k: round(statistics.median(run[k] for run in runs_), 2) for k in runs_[0]}
            for name, runs_ in conditions.items()
        }
        offs = conditions["off"]
        for name, runs_ in conditions.items():
            if name != "off":  # each round against the same round's "off": the machine's drift cancels
                ratios = [a["fps"] / b["fps"] for a, b in zip(runs_, offs, strict=True) if b["fps"] > 0]
                summary[scenario][name]["fps_vs_off"] = round(statistics.median(ratios), 3) if ratios else None
    return summary


def _decoded(video: Path) -> list[np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(str(video))
    frames = []
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise StyleError(f"{video}: no frame could be read back")
    return frames


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in figures.items()}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.devtools.style_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", help="ONNX style model (default: an untrained default-architecture network)")
    parser.add_argument("--faces", default=str(DEFAULT_FACES), help="folder of per-person face photos")
    parser.add_argument("--seconds", type=float, default=12.0, help="video length")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every condition")
    parser.add_argument("--loop-seconds", type=float, default=4.0, help="pipeline_loop: seconds per condition")
    parser.add_argument("--snapshots", type=int, default=300, help="snapshots queued for the style worker")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--idle-after-s", type=float, default=1.0, help="camera scenario: quiet time before painting")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in (
        "edge_agent.style.worker",
        "edge_agent.delivery.snapshots",
        "edge_agent.capture",
        "edge_agent.devtools.videogen",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        summary = bench(args)
    except FaceAttendError as exc:
        sys.stderr.write(f"style-bench: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
