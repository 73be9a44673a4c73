"""Synthetic door-camera videos built from real face photos, with their ground truth (we ship this, never a video).

Each scheduled appearance pastes one photo's face (cut out with a soft elliptical mask) onto a procedural
corridor background and walks it towards the camera: it moves along a path, grows from far (small) to near (large),
is lit with its own brightness / contrast / gamma / colour cast, is partly hidden for a stretch by an occluder (a
scarf, a door post or a hand: 20-35 % of the face box), and may be motion-blurred; every frame gets sensor noise.
Gaps without faces separate the groups, so the agent's tracks and attendance windows end between them.

The ground truth (JSON next to the video) lists each appearance (person, photo, enrolled or stranger, frames,
seconds) with the face box and occluded fraction on every frame. Everything derives from the seed: the same spec
renders the same frames.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.errors import ImageError, VideoGenError
from models.evaluation.scoring import load_identities
from models.face.detector import RetinaFaceDetector
from models.imageio import load_image

log = logging.getLogger(__name__)

TRUTH_SCHEMA = "faceattend.videogen.truth"
TRUTH_SCHEMA_VERSION = 1
MAX_FACES_PER_FRAME = 3
TAIL_S = 1.0  # faceless seconds after the last appearance when the duration is not given
CODECS = {".avi": "MJPG", ".mp4": "mp4v"}  # both written and read back by the opencv-python wheel's FFMPEG
# The soft mask around a face box: semi-axes as multiples of half the box, centre raised to keep the forehead, and
# the feather (blur) width. Wide enough that the detector and the aligned 150 px chip see the whole face.
ELLIPSE_X = 1.30
ELLIPSE_Y = 1.40
ELLIPSE_RAISE = 0.10  # of the box height
FEATHER = 0.12  # of the box width
OCCLUSION_RANGE = (0.20, 0.35)  # fraction of the face box an occluder hides
OCCLUDED_SHARE = (0.20, 0.30)  # fraction of an appearance's frames with the occluder
NOISE_POOL = 8  # precomputed noise fields, picked per frame (drawing fresh Gaussian noise costs ~10 ms a frame)


# --- the schedule ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Appearance:
    """One person crossing the frame. Appearances that overlap in time share `lanes` (vertical strips of the
    frame) and each takes its own `lane`, so their faces never overlap."""

    person: str
    photo: Path
    start_s: float
    end_s: float
    enrolled: bool
    lane: int = 0
    lanes: int = 1


@dataclass(frozen=True)
class VideoSpec:
    appearances: tuple[Appearance, ...]
    width: int = 640
    height: int = 480
    fps: float = 15.0
    seed: int = 0
    duration_s: float | None = None  # None: the last appearance's end + TAIL_S
    min_face_px: int = 60  # face box height when a person enters (far away) ...
    max_face_px: int = 220  # ... and at most when they reach the camera
    occlusion: bool = True
    motion_blur: bool = True
    noise_sigma: float = 3.0  # sensor noise, in 8-bit levels

    def __post_init__(self) -> None:
        if not self.appearances:
            raise VideoGenError("appearances: the video needs at least one appearance")
        if not (64 <= self.width <= 4096 and 64 <= self.height <= 4096) or self.width % 2 or self.height % 2:
            raise VideoGenError(f"frame size: need even sides in 64..4096, got {self.width}x{self.height}")
        if not 1.0 <= self.fps <= 120.0:
            raise VideoGenError(f"fps: need 1..120, got {self.fps}")
        if not 16 <= self.min_face_px <= self.max_face_px <= self.height:
            raise VideoGenError(
                f"face sizes: need 16 <= min_face_px ({self.min_face_px}) <= max_face_px ({self.max_face_px}) "
                f"<= height ({self.height})"
            )
        if not 0.0 <= self.noise_sigma <= 50.0:
            raise VideoGenError(f"noise_sigma: need 0..50, got {self.noise_sigma}")
        for i, a in enumerate(self.appearances):
            if not 0.0 <= a.start_s < a.end_s:
                raise VideoGenError(
                    f"appearances[{i}] ({a.person}): need 0 <= start_s < end_s, got {a.start_s}..{a.end_s}"
                )
            if not 0 <= a.lane < a.lanes <= MAX_FACES_PER_FRAME:
                raise VideoGenError(f"appearances[{i}] ({a.person}): need 0 <= lane < lanes <= {MAX_FACES_PER_FRAME}")
            if a.end_s * self.fps - a.start_s * self.fps < 2:
                raise VideoGenError(f"appearances[{i}] ({a.person}): shorter than two frames")
        for i, a in enumerate(self.appearances):
            for j in range(i + 1, len(self.appearances)):
                b = self.appearances[j]
                if a.start_s < b.end_s and b.start_s < a.end_s and (a.lanes != b.lanes or a.lane == b.lane):
                    raise VideoGenError(
                        f"appearances[{i}] ({a.person}) and [{j}] ({b.person}) overlap in time: they need the same "
                        f"`lanes` and different `lane`s"
                    )
        if self.duration_s is not None and self.duration_s < max(a.end_s for a in self.appearances):
            raise VideoGenError(f"duration_s: {self.duration_s} ends before the last appearance")

    @property
    def frame_count(self) -> int:
        end = self.duration_s if self.duration_s is not None else max(a.end_s for a in self.appearances) + TAIL_S
        return math.ceil(end * self.fps)


def load_people(root: Path) -> dict[str, tuple[Path, ...]]:
    """A folder-per-person photo set -> {person: photos}, sorted."""
    if not root.is_dir():
        raise VideoGenError(f"{root}: not a folder (expected one sub-folder of photos per person)")
    people = {name: tuple(root / rel for rel in files) for name, files in load_identities(root).items()}
    if not people:
        raise VideoGenError(f"{root}: no person sub-folder with photos")
    return people


def plan_appearances(
    people: Mapping[str, Sequence[Path]],
    *,
    enrolled: Sequence[str],
    strangers: Sequence[str] = (),
    enrollment_photos: Mapping[str, Sequence[Path]],
    seed: int = 0,
    appearance_s: float = 3.0,
    gap_s: float = 1.5,
    lead_s: float = 0.5,
    max_together: int = MAX_FACES_PER_FRAME,
    stagger_s: float = 0.5,
) -> tuple[Appearance, ...]:
    """Each person once, in a seeded order, in groups of 1..max_together side by side (each entering up to
    stagger_s after the first), the groups separated by gap_s without faces.

    An enrolled person is shown with a photo that is not among their `enrollment_photos` (the video must test
    recognition on an unseen photo); a stranger with any of theirs.
    """
    if not enrolled and not strangers:
        raise VideoGenError("plan: no people to show (enrolled and strangers are both empty)")
    if not 1 <= max_together <= MAX_FACES_PER_FRAME:
        raise VideoGenError(f"max_together: need 1..{MAX_FACES_PER_FRAME}, got {max_together}")
    if appearance_s <= 0 or gap_s < 0 or lead_s < 0 or stagger_s < 0:
        raise VideoGenError("plan: appearance_s must be > 0, and gap_s, lead_s, stagger_s >= 0")
    both = sorted(set(enrolled) & set(strangers))
    if both:
        raise VideoGenError(f"plan: {', '.join(both)} listed both as enrolled and as stranger")
    rng = np.random.default_rng(seed)
    choices: list[tuple[str, Path, bool]] = []
    for person, is_enrolled in [(p, True) for p in enrolled] + [(p, False) for p in strangers]:
        photos = sorted(Path(p) for p in people.get(person, ()))
        if not photos:
            raise VideoGenError(f"plan: no photos for {person!r}")
        if is_enrolled:
            used = {Path(p).resolve() for p in enrollment_photos.get(person, ())}
            if not used:
                raise VideoGenError(f"plan: enrolled person {person!r} has no enrollment photos listed")
            photos = [p for p in photos if p.resolve() not in used]
            if not photos:
                raise VideoGenError(f"plan: every photo of {person!r} was used for enrollment; none left to show")
        choices.append((person, photos[int(rng.integers(len(photos)))], is_enrolled))
    order = [choices[i] for i in rng.permutation(len(choices))]
    out: list[Appearance] = []
    t = lead_s
    while order:
        size = min(int(rng.integers(1, max_together + 1)), len(order))
        group, order = order[:size], order[size:]
        end = t
        for lane, (person, photo, is_enrolled) in enumerate(group):
            start = t + (float(rng.uniform(0, stagger_s)) if lane else 0.0)
            out.append(
                Appearance(
                    person, photo, round(start, 3), round(start + appearance_s, 3), is_enrolled, lane, len(group)
                )
            )
            end = max(end, start + appearance_s)
        t = end + gap_s
    return tuple(out)


# --- ground truth ---------------------------------------------------------------------------------------------------
def _box4(values: Iterable[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)  # ValueError unless exactly four
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class FaceBox:
    frame: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the face (the detector's box of the photo, mapped)
    occluded: float  # fraction of the box hidden by an occluder


@dataclass(frozen=True)
class TruthAppearance:
    person: str
    photo: str
    enrolled: bool
    start_frame: int  # first frame showing the face
    end_frame: int  # one past the last
    start_s: float
    end_s: float
    boxes: tuple[FaceBox, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "person": self.person,
            "photo": self.photo,
            "enrolled": self.enrolled,
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "boxes": [{"frame": b.frame, "box": list(b.box), "occluded": b.occluded} for b in self.boxes],
        }


@dataclass(frozen=True)
class GroundTruth:
    video: str  # file name of the video, next to the truth file
    width: int
    height: int
    fps: float
    frame_count: int
    seed: int
    appearances: tuple[TruthAppearance, ...]

    def faces_at(self, frame: int) -> list[tuple[TruthAppearance, FaceBox]]:
        out = []
        for a in self.appearances:
            if a.start_frame <= frame < a.end_frame:
                out.append((a, a.boxes[frame - a.start_frame]))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": TRUTH_SCHEMA,
            "schema_version": TRUTH_SCHEMA_VERSION,
            "video": self.video,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "frame_count": self.frame_count,
            "seed": self.seed,
            "appearances": [a.to_json() for a in self.appearances],
        }

    @classmethod
    def from_json(cls, data: Any) -> GroundTruth:
        if not isinstance(data, Mapping):
            raise VideoGenError(f"malformed ground truth: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != TRUTH_SCHEMA or data.get("schema_version") != TRUTH_SCHEMA_VERSION:
            raise VideoGenError(
                f"not a v{TRUTH_SCHEMA_VERSION} ground truth: schema {data.get('schema')!r} "
                f"version {data.get('schema_version')!r}"
            )
        try:
            appearances = tuple(
                TruthAppearance(
                    person=str(a["person"]),
                    photo=str(a["photo"]),
                    enrolled=bool(a["enrolled"]),
                    start_frame=int(a["start_frame"]),
                    end_frame=int(a["end_frame"]),
                    start_s=float(a["start_s"]),
                    end_s=float(a["end_s"]),
                    boxes=tuple(FaceBox(int(b["frame"]), _box4(b["box"]), float(b["occluded"])) for b in a["boxes"]),
                )
                for a in data["appearances"]
            )
            return cls(
                video=str(data["video"]),
                width=int(data["width"]),
                height=int(data["height"]),
                fps=float(data["fps"]),
                frame_count=int(data["frame_count"]),
                seed=int(data["seed"]),
                appearances=appearances,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VideoGenError(f"malformed ground truth: {exc!r}") from exc

    def save(self, path: Path) -> None:
        try:
            path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise VideoGenError(f"{path}: cannot write the ground truth ({exc})") from exc

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise VideoGenError(f"{path}: cannot read the ground truth ({exc})") from exc


def truth_path(video: Path) -> Path:
    """Where the ground truth of a video lives: `door.avi` -> `door.truth.json`."""
    return video.with_name(video.stem + ".truth.json")


# --- rendering ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Cutout:
    """A photo's face cut out at working scale: BGR pixels, soft alpha, and the detector's face box inside it."""

    image: np.ndarray  # h x w x 3 uint8 BGR
    alpha: np.ndarray  # h x w float32 in 0..1
    box: tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class _Occluder:
    shape: str  # "scarf" | "post_left" | "post_right" | "hand"
    fraction: float  # of the face box hidden
    colour: tuple[int, int, int]
    centre: tuple[float, float] = (0.5, 0.75)  # hand only, in face-box units


@dataclass(frozen=True, eq=False)
class _Track:
    """One appearance laid out frame by frame (index 0 = its first frame)."""

    appearance: Appearance
    cutout: _Cutout  # already lit for this appearance
    start_frame: int
    centres: np.ndarray  # n x 2: face box centre per frame
    heights: np.ndarray  # n: face box height per frame
    occluder: _Occluder | None
    occluded_frames: range  # frame offsets showing the occluder
    blur: np.ndarray | None  # motion-blur kernel, or None

    @property
    def end_frame(self) -> int:
        return self.start_frame + len(self.heights)


def _largest_face(photo: Path, rgb: np.ndarray, detector: RetinaFaceDetector) -> tuple[float, float, float, float]:
    faces = detector.detect(rgb)
    if not faces:
        raise VideoGenError(f"{photo}: the detector finds no face in this photo")
    return max(faces, key=lambda d: d.width * d.height).bbox


def _cut_out(photo: Path, detector: RetinaFaceDetector, max_face_px: int) -> _Cutout:
    try:
        rgb = load_image(photo)
    except ImageError as exc:
        raise VideoGenError(f"{photo}: unreadable photo ({exc})") from exc
    x1, y1, x2, y2 = _largest_face(photo, rgb, detector)
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - ELLIPSE_RAISE * h
    ax, ay = ELLIPSE_X * w / 2, ELLIPSE_Y * h / 2
    pad = 2 * FEATHER * w
    left, top = math.floor(cx - ax - pad), math.floor(cy - ay - pad)
    right, bottom = math.ceil(cx + ax + pad), math.ceil(cy + ay + pad)
    # a tight crop has no pixels around the face: repeat its border rather than paste black
    rows, cols = rgb.shape[:2]
    crop = cv2.copyMakeBorder(
        np.ascontiguousarray(rgb[max(top, 0) : min(bottom, rows), max(left, 0) : min(right, cols), ::-1]),
        max(-top, 0),
        max(bottom - rows, 0),
        max(-left, 0),
        max(right - cols, 0),
        cv2.BORDER_REPLICATE,
    )
    # one downscale here (big photos are 2-4k px) so per-frame resizing only ever handles a face-sized patch
    scale = min(1.0, 1.1 * max_face_px / h)
    if scale < 1.0:
        crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    alpha = np.zeros(crop.shape[:2], np.float32)
    centre = ((cx - left) * scale, (cy - top) * scale)
    cv2.ellipse(alpha, (centre, (2 * ax * scale, 2 * ay * scale), 0.0), 1.0, -1, cv2.LINE_AA)
    sigma = FEATHER * w * scale / 2
    alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    box = ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)
    return _Cutout(crop, alpha, box)


def _light(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, gamma and a colour cast, as one lookup table per channel."""
    gamma = rng.uniform(0.75, 1.35)
    contrast = rng.uniform(0.75, 1.15)
    brightness = rng.uniform(-0.12, 0.10)
    gains = rng.uniform(0.88, 1.12, 3)
    x = np.linspace(0.0, 1.0, 256)
    base = ((x**gamma - 0.5) * contrast + 0.5 + brightness)[:, None] * gains[None, :]
    lut = np.clip(base * 255 + 0.5, 0, 255).astype(np.uint8).reshape(256, 1, 3)
    return cv2.LUT(image, lut)


def _motion_kernel(direction: np.ndarray, length: int) -> np.ndarray:
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = direction * c
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1, cv2.LINE_AA)
    return kernel / kernel.sum()


def _occluder(rng: np.random.Generator) -> _Occluder:
    fraction = float(rng.uniform(*OCCLUSION_RANGE))
    shape = ("scarf", "post_left", "post_right", "hand")[int(rng.integers(4))]
    palette = ((40, 40, 45), (60, 90, 150), (120, 150, 190), (35, 70, 110), (150, 60, 40), (200, 200, 205))
    colour = palette[int(rng.integers(len(palette)))]
    r = math.sqrt(fraction / math.pi)  # a hand: a disc of that area in face-box units, wholly inside the box
    centre = (float(rng.uniform(r, 1 - r)), float(rng.uniform(max(r, 0.45), 1 - r)))
    return _Occluder(shape, fraction, colour, centre)


def _frames_of(spec: VideoSpec, a: Appearance) -> tuple[int, int]:
    start = math.ceil(a.start_s * spec.fps - 1e-9)
    return start, min(math.ceil(a.end_s * spec.fps - 1e-9), spec.frame_count)


def _layout(spec: VideoSpec, a: Appearance, cutout: _Cutout, rng: np.random.Generator) -> _Track:
    start, end = _frames_of(spec, a)
    n = end - start
    bx1, by1, bx2, by2 = cutout.box
    aspect = (bx2 - bx1) / (by2 - by1)
    lane_w = spec.width / a.lanes
    lane_x = a.lane * lane_w
    # the face at its largest must leave its mask inside its lane, and the frame some room above and below
    largest = min(spec.max_face_px, lane_w / (ELLIPSE_X * aspect), 0.75 * spec.height)
    h0 = min(spec.min_face_px * rng.uniform(1.0, 1.3), largest)
    h1 = max(h0, largest * rng.uniform(0.8, 1.0))
    t = np.linspace(0.0, 1.0, n)
    # perspective of someone walking at a steady pace: the size's inverse (the distance) falls linearly
    heights = 1.0 / ((1 - t) / h0 + t / h1)

    def x_in_lane(h: float) -> float:
        half = h * aspect / 2 + 2
        return float(rng.uniform(lane_x + half, max(lane_x + half, lane_x + lane_w - half)))

    x0, x1 = x_in_lane(h0), x_in_lane(h1)
    y0 = float(rng.uniform(0.30, 0.45)) * spec.height
    y1 = float(rng.uniform(0.45, 0.55)) * spec.height
    sway = 0.03 * lane_w * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0, 2 * np.pi))
    xs = x0 + (x1 - x0) * t + sway
    ys = y0 + (y1 - y0) * t
    # keep the whole face box inside the frame
    half_w, half_h = heights * aspect / 2 + 1, heights / 2 + 1
    xs = np.clip(xs, half_w, spec.width - half_w)
    ys = np.clip(ys, half_h, spec.height - half_h)
    centres = np.column_stack((xs, ys))

    occluder, occluded = None, range(0)
    if spec.occlusion:
        occluder = _occluder(rng)
        length = max(1, round(n * rng.uniform(*OCCLUDED_SHARE)))
        first = int(rng.integers(n // 4, max(n // 4 + 1, n - length - n // 8)))
        occluded = range(first, min(n, first + length))
    blur = None
    if spec.motion_blur and rng.uniform() < 0.5:
        step = centres[-1] - centres[0]
        direction = step / (np.linalg.norm(step) or 1.0)
        blur = _motion_kernel(direction, int(rng.integers(3, 6)))
    lit = _Cutout(_light(cutout.image, rng), cutout.alpha, cutout.box)
    return _Track(a, lit, start, centres, heights, occluder, occluded, blur)


def _background(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """A corridor wall: a lit gradient, blotches, a door frame, a floor band, a few posters and fine texture."""
    w, h = spec.width, spec.height
    top, bottom = rng.uniform(90, 200, 3), rng.uniform(60, 170, 3)
    v = np.linspace(0.0, 1.0, h)[:, None, None]
    img = np.empty((h, w, 3), np.float32)
    img[:] = top + (bottom - top) * v
    blotches = cv2.resize(rng.uniform(-1, 1, (6, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img += 14 * blotches[:, :, None]
    floor = round(h * rng.uniform(0.82, 0.9))
    img[floor:] *= 0.6
    for _ in range(int(rng.integers(1, 4))):
        pw, ph = int(rng.integers(w // 20, w // 4)), int(rng.integers(h // 20, h // 4))
        x, y = int(rng.integers(0, w - pw)), int(rng.integers(0, floor - ph))
        cv2.rectangle(img, (x, y), (x + pw, y + ph), rng.uniform(30, 230, 3).tolist(), -1)
    door_x = int(rng.integers(0, w - w // 4))
    cv2.rectangle(img, (door_x, h // 10), (door_x + w // 4, floor), rng.uniform(20, 90, 3).tolist(), max(4, w // 80))
    img += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


class VideoRenderer:
    """Renders a spec's frames (BGR uint8); the ground truth is known before the first frame is drawn.

    `detector` locates the face in each photo (one shared with the caller avoids loading another); by default one
    is created on ONNX Runtime and closed once the photos are cut out.
    """

    def __init__(self, spec: VideoSpec, detector: RetinaFaceDetector | None = None) -> None:
        self.spec = spec
        own = detector is None
        if detector is None:
            detector = RetinaFaceDetector.create()
        try:
            cutouts: dict[Path, _Cutout] = {}
            for a in spec.appearances:
                if a.photo not in cutouts:
                    cutouts[a.photo] = _cut_out(a.photo, detector, spec.max_face_px)
        finally:
            if own:
                detector.close()
        self._tracks = tuple(
            _layout(spec, a, cutouts[a.photo], np.random.default_rng((spec.seed, 1, i)))
            for i, a in enumerate(spec.appearances)
        )
        scene = np.random.default_rng((spec.seed, 0))
        self._background = _background(spec, scene)
        self._noise = [self._noise_field(scene) for _ in range(NOISE_POOL)] if spec.noise_sigma > 0 else []
        self.truth = GroundTruth(
            video="",
            width=spec.width,
            height=spec.height,
            fps=spec.fps,
            frame_count=spec.frame_count,
            seed=spec.seed,
            appearances=tuple(self._truth_of(track) for track in self._tracks),
        )

    def _noise_field(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian noise split into its positive and negative parts: two saturating uint8 ops add it to a frame."""
        noise = rng.normal(0.0, self.spec.noise_sigma, (self.spec.height, self.spec.width, 3))
        return np.clip(noise, 0, 255).astype(np.uint8), np.clip(-noise, 0, 255).astype(np.uint8)

    @staticmethod
    def _box(track: _Track, i: int) -> tuple[float, float, float, float]:
        bx1, by1, bx2, by2 = track.cutout.box
        s = track.heights[i] / (by2 - by1)
        cx, cy = track.centres[i]
        half_w, half_h = (bx2 - bx1) * s / 2, (by2 - by1) * s / 2
        return (float(cx - half_w), float(cy - half_h), float(cx + half_w), float(cy + half_h))

    def _truth_of(self, track: _Track) -> TruthAppearance:
        a = track.appearance
        fraction = track.occluder.fraction if track.occluder else 0.0
        boxes = tuple(
            FaceBox(
                track.start_frame + i,
                _box4(round(v, 1) for v in self._box(track, i)),  # 0.1 px: the JSON stays short and exact
                round(fraction, 3) if i in track.occluded_frames else 0.0,
            )
            for i in range(len(track.heights))
        )
        return TruthAppearance(
            person=a.person,
            photo=str(a.photo),
            enrolled=a.enrolled,
            start_frame=track.start_frame,
            end_frame=track.end_frame,
            start_s=track.start_frame / self.spec.fps,
            end_s=track.end_frame / self.spec.fps,
            boxes=boxes,
        )

    def frame(self, index: int) -> np.ndarray:
        if not 0 <= index < self.spec.frame_count:
            raise VideoGenError(f"frame {index}: outside 0..{self.spec.frame_count - 1}")
        out = self._background.copy()
        for track in self._tracks:
            if track.start_frame <= index < track.end_frame:
                self._draw_face(out, track, index - track.start_frame)
        if self._noise:
            positive, negative = self._noise[
                int(np.random.default_rng((self.spec.seed, 2, index)).integers(NOISE_POOL))
            ]
            cv2.add(out, positive, dst=out)
            cv2.subtract(out, negative, dst=out)
        return out

    def frames(self) -> Iterator[np.ndarray]:
        for index in range(self.spec.frame_count):
            yield self.frame(index)

    def _draw_face(self, out: np.ndarray, track: _Track, i: int) -> None:
        cut = track.cutout
        bx1, by1, bx2, by2 = cut.box
        s = float(track.heights[i] / (by2 - by1))
        ch, cw = cut.image.shape[:2]
        size = (max(1, round(cw * s)), max(1, round(ch * s)))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        patch = cv2.resize(cut.image, size, interpolation=interp)
        alpha = cv2.resize(cut.alpha, size, interpolation=interp)
        if track.blur is not None:
            patch = cv2.filter2D(patch, -1, track.blur)
            alpha = cv2.filter2D(alpha, -1, track.blur)
        cx, cy = track.centres[i]
        left = round(cx - (bx1 + bx2) / 2 * s)
        top = round(cy - (by1 + by2) / 2 * s)
        # clip the patch to the frame
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + size[0], out.shape[1]), min(top + size[1], out.shape[0])
        if x1 <= x0 or y1 <= y0:
            return
        p = patch[y0 - top : y1 - top, x0 - left : x1 - left].astype(np.float32)
        a = alpha[y0 - top : y1 - top, x0 - left : x1 - left, None]
        roi = out[y0:y1, x0:x1]
        roi[:] = (roi + (p - roi) * a + 0.5).astype(np.uint8)
        if track.occluder is not None and i in track.occluded_frames:
            _draw_occluder(out, track.occluder, self._box(track, i))


def _draw_occluder(out: np.ndarray, occ: _Occluder, box: tuple[float, float, float, float]) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1

    def at(u: float, v: float) -> tuple[int, int]:
        return round(x1 + u * w), round(y1 + v * h)

    f = occ.fraction
    if occ.shape == "scarf":
        cv2.rectangle(out, at(-0.15, 1 - f), at(1.15, 1.3), occ.colour, -1, cv2.LINE_AA)
    elif occ.shape == "post_left":  # a door post: the frame's full height
        cv2.rectangle(out, (at(-0.4, 0)[0], 0), (at(f, 0)[0], out.shape[0]), occ.colour, -1, cv2.LINE_AA)
    elif occ.shape == "post_right":
        cv2.rectangle(out, (at(1 - f, 0)[0], 0), (at(1.4, 0)[0], out.shape[0]), occ.colour, -1, cv2.LINE_AA)
    else:
        r = math.sqrt(f / math.pi)
        centre = at(*occ.centre)
        cv2.ellipse(out, centre, (round(r * w), round(r * h)), 0.0, 0.0, 360.0, occ.colour, -1, cv2.LINE_AA)


def generate_video(
    spec: VideoSpec,
    out: Path,
    progress: Callable[[int], None] | None = None,
    *,
    detector: RetinaFaceDetector | None = None,
) -> GroundTruth:
    """Render `spec` into `out` (.avi: MJPG, .mp4: mp4v) and its ground truth into truth_path(out).

    The video is written under a temporary name and renamed when complete, so a camera reading `out` never opens
    half a file. `progress(n)` is called with the number of frames just written.
    """
    codec = CODECS.get(out.suffix.lower())
    if codec is None:
        raise VideoGenError(f"{out}: unsupported video type {out.suffix!r}; use one of {', '.join(CODECS)}")
    renderer = VideoRenderer(spec, detector)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VideoGenError(f"{out.parent}: cannot create the folder ({exc})") from exc
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*codec), spec.fps, (spec.width, spec.height))
    if not writer.isOpened():
        raise VideoGenError(f"{out}: OpenCV cannot write {codec} video here")
    try:
        for image in renderer.frames():
            writer.write(image)
            if progress is not None:
                progress(1)
    finally:
        writer.release()
    try:
        partial.replace(out)
    except OSError as exc:
        raise VideoGenError(f"{out}: cannot write the video ({exc})") from exc
    truth = replace(renderer.truth, video=out.name)
    truth.save(truth_path(out))
    log.info(
        "wrote %s: %d frames %dx%d at %g fps, %d appearances",
        out,
        spec.frame_count,
        spec.width,
        spec.height,
        spec.fps,
        len(spec.appearances),
    )
    return truth
