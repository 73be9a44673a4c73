"""Speed of the face pipeline next to the face_recognition library, measured in the same run on the same images.

Figures are medians of repeated runs after a warm-up. The peer (dlib's HOG detector + the same dlib ResNet
encoder, through face_recognition) is optional: without it our figures stand alone.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from models.errors import ImageError
from models.face.pipeline import FacePipeline

log = logging.getLogger(__name__)

FRAME_W, FRAME_H = 640, 480


@dataclass(frozen=True)
class Figure:
    name: str
    ours_ms: float
    peer_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.peer_ms / self.ours_ms if self.peer_ms and self.ours_ms > 0 else None


@dataclass(frozen=True)
class BenchReport:
    backend: str
    threads: int | None
    frames: int
    images: int
    figures: tuple[Figure, ...]
    peak_rss_mib_ours: float
    peak_rss_mib_total: float
    peer: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        out = asdict(self)
        out["figures"] = [dict(asdict(f), speedup=f.speedup) for f in self.figures]
        return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def to_frame(image: np.ndarray, width: int = FRAME_W, height: int = FRAME_H) -> np.ndarray:
    """Fit a photo into a width x height frame (letterboxed), as a camera would deliver it."""
    scale = min(width / image.shape[1], height / image.shape[0])
    w, h = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    y, x = (height - h) // 2, (width - w) // 2
    frame[y : y + h, x : x + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return frame


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _per_item_ms(fn: Callable[[object], object], items: Sequence[object], rounds: int) -> float:
    """Median over rounds of the mean time per item (one warm-up pass first)."""
    for item in items[:2]:
        fn(item)
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        per_round.append((time.perf_counter() - t0) * 1e3 / len(items))
    return statistics.median(per_round)


class _Peer:
    def __init__(self) -> None:
        import face_recognition

        self.fr = face_recognition

    def detect(self, image: np.ndarray) -> list:
        return self.fr.face_locations(image, number_of_times_to_upsample=1)

    def encode(self, image: np.ndarray, locations: list) -> list:
        return self.fr.face_encodings(image, locations)

    def pipeline(self, image: np.ndarray) -> list:
        return self.encode(image, self.detect(image))


def run_bench(
    pipeline: FacePipeline,
    images: Sequence[np.ndarray],
    *,
    backend: str,
    threads: int | None,
    rounds: int = 3,
    with_peer: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    say = progress or (lambda _msg: None)
    notes = []
    frames = [to_frame(im) for im in images]
    figures: list[Figure] = []

    say("detection, 640x480 frames")
    det_ms = _per_item_ms(pipeline.detect, frames, rounds)

    # Chips for the encoder: every face found in the frames, repeated to fill batches of 8.
    located = [(f, pipeline.detect(f)) for f in frames]
    faces = sum(len(d) for _, d in located)
    if faces == 0:
        raise ImageError("no face found in the benchmark images")
    say(f"alignment ({pipeline.aligner.method})")
    align_ms = _median_ms(lambda: [pipeline.aligner.align(f, d) for f, d in located], repeats=rounds) / faces
    chips = np.concatenate([pipeline.aligner.align(f, d) for f, d in located])
    batch8 = np.resize(chips, (8, *chips.shape[1:]))
    say("encoding, batch 1 and 8")
    enc1 = _median_ms(lambda: pipeline.encoder.encode(chips[:1]), repeats=10 * rounds)
    enc8 = _median_ms(lambda: pipeline.encoder.encode(batch8), repeats=3 * rounds) / 8

    say("whole pipeline, 640x480 frames and original photos")
    whole_frame = _per_item_ms(pipeline.embed, frames, rounds)
    whole_photo = _per_item_ms(pipeline.embed, images, rounds)
    ours_rss = _peak_rss_mib()

    peer = None
    peer_ms: dict[str, float | None] = dict.fromkeys(("det", "enc", "frame", "photo"))
    if with_peer:
        try:
            peer = _Peer()
        except ImportError:
            notes.append("face_recognition is not installed: no peer figures (pip install faceattend[peer])")
    if peer is not None:
        say("peer: face_recognition (HOG + dlib ResNet)")
        peer_ms["det"] = _per_item_ms(peer.detect, frames, 1)
        located = [(f, peer.detect(f)) for f in frames]
        located = [(f, locs) for f, locs in located if locs]
        faces = sum(len(locs) for _, locs in located)
        if faces:
            t0 = time.perf_counter()
            for f, locs in located:
                peer.encode(f, locs)
            peer_ms["enc"] = (time.perf_counter() - t0) * 1e3 / faces
        peer_ms["frame"] = _per_item_ms(peer.pipeline, frames, 1)
        peer_ms["photo"] = _per_item_ms(peer.pipeline, images, 1)
        notes.append("peer encoding per face includes its 5-point landmark step, as face_encodings runs it")

    figures = [
        Figure("detection per 640x480 frame", det_ms, peer_ms["det"]),
        Figure(f"alignment per face ({pipeline.aligner.method})", align_ms, None),
        Figure("encoding per face, batch 1", enc1, peer_ms["enc"]),
        Figure("encoding per face, batch 8", enc8, peer_ms["enc"]),
        Figure("detect+align+encode per 640x480 frame", whole_frame, peer_ms["frame"]),
        Figure("detect+align+encode per original photo", whole_photo, peer_ms["photo"]),
    ]
    return BenchReport(
        backend=backend,
        threads=threads,
        frames=len(frames),
        images=len(images),
        figures=tuple(figures),
        peak_rss_mib_ours=round(ours_rss, 1),
        peak_rss_mib_total=round(_peak_rss_mib(), 1),
        peer="face_recognition" if peer else None,
        notes=tuple(notes),
    )


def format_report(report: BenchReport) -> str:
    lines = [
        f"backend {report.backend}, threads {report.threads or 'auto'}, {report.frames} frames / photos",
        f"{'stage':<42}{'ours ms':>10}{'peer ms':>10}{'speed-up':>10}",
    ]
    for f in report.figures:
        peer = f"{f.peer_ms:10.1f}" if f.peer_ms is not None else f"{'-':>10}"
        ratio = f"{f.speedup:9.1f}x" if f.speedup is not None else f"{'-':>10}"
        lines.append(f"{f.name:<42}{f.ours_ms:10.2f}{peer}{ratio}")
    lines.append(f"peak RSS: {report.peak_rss_mib_ours:.0f} MiB after ours, {report.peak_rss_mib_total:.0f} MiB in all")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)
