"""Face quality gates (enrollment photos, and edge captures before encoding): each rejection has one specific,
machine-readable reason.

Thresholds were set on the development face sets (aligned 150x150 dlib chips, our detector's landmarks). Blur: the
chip's Laplacian variance is ~340 (median) on the 27-person set's large faces but only 42 on lfw-dev's press photos
(faces ~110 px, JPEG-soft; 5th percentile 17), which still recognise as well as sharper ones (one-shot at 474
people: rank-1 0.95 below a figure of 25, 0.96-0.99 above). A Gaussian blur of sigma 1.5 on those photos brings
the median to 9, sigma 3 to 4: the gate refuses below 12, i.e. real blur, not a soft source (at 25 it refused 19 %
of lfw-dev's photos). Eye distances below ~28 px mean the chip is an upscale; |yaw| above 0.4 (nose offset from
the eyes' midpoint in eye distances) is a half profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import cv2
import numpy as np

from models.errors import ConfigError
from models.face.alignment import CHIP_SIZE, CHIP_SIZES
from models.types import FaceEmbedding

# The blur figure is in the units of dlib's 150x150 chip, where every blur threshold was set. The tighter 112x112
# ArcFace chip of the same face has about 3x its Laplacian variance (median ratio 2.4-3.5 over the test faces and 300
# lfw-dev images, sharp and Gaussian-blurred with sigma 1-3), so its variance is divided by 3: a gate then rejects
# about the same faces whichever encoder runs.
_BLUR_DIVISOR = {CHIP_SIZE: 1.0, CHIP_SIZES["arcface112"]: 3.0}

# reason codes (stable: the API and the CLI report them)
NO_FACE = "no_face"
SEVERAL_FACES = "several_faces"
LOW_CONFIDENCE = "low_confidence"
TOO_SMALL = "too_small"
TOO_BLURRED = "too_blurred"
OFF_FRONTAL = "off_frontal"
UNREADABLE = "unreadable_image"
DUPLICATE_IMAGE = "duplicate_image"
DUPLICATE_TEMPLATE = "duplicate_template"
PROBABLE_DUPLICATE_IDENTITY = "probable_duplicate_identity"
NOT_THIS_PERSON = "not_this_person"


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    min_detector_score: float = 0.9
    min_eye_distance_px: float = 28.0
    min_blur: float = 12.0  # Laplacian variance of the aligned grey chip
    max_yaw: float = 0.4  # |nose offset from the eyes' midpoint| / eye distance
    pitch_range: tuple[float, float] = (0.3, 0.9)  # (nose - eyes) / (mouth - eyes), vertically
    # A photo with several faces is taken for its largest when that face is at least this many times the next
    # largest (box side): the subject of a portrait with people in the background, as press and ID photos often are;
    # faces of similar size stay refused, since which one is meant would be a guess. None: one face only.
    dominant_face_ratio: float | None = 1.6
    # a second photo this close to one of the person's templates adds nothing (same photo, re-encoded); None: the
    # encoder's calibrated distance (models/face/encoders.py), filled in by the enrollment server's config
    duplicate_template_distance: float | None = None

    def __post_init__(self) -> None:
        if self.dominant_face_ratio is not None and not self.dominant_face_ratio > 1:
            raise ConfigError(
                f"dominant_face_ratio: must be > 1 (or null: one face only), got {self.dominant_face_ratio}"
            )


@dataclasses.dataclass(frozen=True)
class FaceFigures:
    detector_score: float
    face_px: float  # the box's shorter side
    eye_distance_px: float
    blur: float
    yaw: float
    pitch: float

    def to_json(self) -> dict:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None  # one of the codes above, None when accepted
    message: str
    figures: FaceFigures | None = None
    face: int = 0  # the index of the face assessed (the dominant one of several)

    def to_json(self) -> dict:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "message": self.message,
            "figures": self.figures.to_json() if self.figures else None,
            "face": self.face,
        }


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def face_figures(face: FaceEmbedding, chip: np.ndarray) -> FaceFigures:
    det = face.detection
    le, re, nose, ml, mr = det.landmarks_array().astype(np.float64)
    eye_mid, mouth_mid = (le + re) / 2, (ml + mr) / 2
    iod = float(np.linalg.norm(re - le))
    # measure pose in the face's own frame, so that a tilted (rolled) head is not mistaken for a turned one
    axis = (re - le) / max(iod, 1e-6)
    normal = np.array([-axis[1], axis[0]])
    yaw = float((nose - eye_mid) @ axis) / max(iod, 1e-6)
    down = float((mouth_mid - eye_mid) @ normal)
    pitch = float((nose - eye_mid) @ normal) / down if abs(down) > 1e-6 else 0.0
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    blur = float(cv2.Laplacian(grey, cv2.CV_64F).var()) / _BLUR_DIVISOR.get(chip.shape[0], 1.0)
    return FaceFigures(det.score, float(min(det.width, det.height)), iod, blur, yaw, pitch)


def _box_side(face: FaceEmbedding) -> float:
    return float(min(face.detection.width, face.detection.height))


def assess_photo(faces: Sequence[FaceEmbedding], chips: np.ndarray, config: QualityConfig) -> Verdict:
    """The photo-level gates (face count, confidence, size, blur, pose) on its one face, or on the dominant one of
    several (`QualityConfig.dominant_face_ratio`; the verdict's `face` says which); duplicates are the enroller's
    job."""
    if not faces:
        return Verdict(False, NO_FACE, "no face found")
    chosen = 0
    if len(faces) > 1:
        sides = sorted(((_box_side(f), i) for i, f in enumerate(faces)), reverse=True)
        (largest, chosen), (second, _) = sides[0], sides[1]
        ratio = config.dominant_face_ratio
        if ratio is None or largest < ratio * second:
            wanted = "" if ratio is None else f" (or one at least {ratio:g} times the size of any other)"
            return Verdict(
                False,
                SEVERAL_FACES,
                f"{len(faces)} faces found, the two largest {largest:.0f} and {second:.0f} px; an enrollment photo "
                f"must show one person{wanted}",
            )
    verdict = _assess_face(faces[chosen], chips[chosen], config)
    if verdict.accepted and len(faces) > 1:
        verdict = dataclasses.replace(verdict, message=f"ok: the largest of {len(faces)} faces")
    return dataclasses.replace(verdict, face=chosen)


def _assess_face(face: FaceEmbedding, chip: np.ndarray, config: QualityConfig) -> Verdict:
    fig = face_figures(face, chip)
    if fig.detector_score < config.min_detector_score:
        return Verdict(
            False, LOW_CONFIDENCE, f"face confidence {fig.detector_score:.2f} is below {config.min_detector_score}", fig
        )
    if fig.eye_distance_px < config.min_eye_distance_px:
        return Verdict(
            False,
            TOO_SMALL,
            f"face too small: {fig.eye_distance_px:.0f} px between the eyes, need {config.min_eye_distance_px:.0f}",
            fig,
        )
    if fig.blur < config.min_blur:
        return Verdict(False, TOO_BLURRED, f"too blurred: sharpness {fig.blur:.0f}, need {config.min_blur:.0f}", fig)
    lo, hi = config.pitch_range
    if abs(fig.yaw) > config.max_yaw or not lo <= fig.pitch <= hi:
        return Verdict(
            False,
            OFF_FRONTAL,
            f"too far off frontal: yaw {fig.yaw:+.2f} (max {config.max_yaw}), pitch {fig.pitch:.2f} (range {lo}-{hi})",
            fig,
        )
    return Verdict(True, None, "ok", fig)
