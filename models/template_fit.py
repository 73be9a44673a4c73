"""Derive the alignment template from dlib's own chips, and measure agreement with dlib's full pipeline.

dlib (the `dlib-bin` wheel) is a development-time reference only: this module imports it lazily and the
runtime never needs it. The method:

1. dlib's reference pipeline on each image: HOG detector, 5-point shape predictor, then
   `get_face_chip_details(shape, 150, 0.25)`, which defines a similarity transform image -> chip.
2. Our detector's landmarks for the same face are mapped through that transform into chip coordinates.
3. The template is the per-landmark median over all faces (robust to the odd poorly detected face).

`compare_with_dlib` then embeds each image both ways and reports the Euclidean distances between the two
pipelines' embeddings of the same face.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import ModelError
from models.imageio import load_image

log = logging.getLogger(__name__)

Landmarker = Callable[[np.ndarray], list[tuple[tuple[float, float, float, float], np.ndarray]]]


@dataclass(frozen=True)
class DlibFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    image_to_chip: np.ndarray  # 2x3
    shape: object  # dlib.full_object_detection, kept for dlib's own embedding


@dataclass(frozen=True)
class TemplateFit:
    template: np.ndarray  # 5x2
    faces: int
    spread_px: np.ndarray  # per-landmark median absolute deviation in chip pixels


@dataclass(frozen=True)
class PipelineAgreement:
    distances: tuple[float, ...]
    images: int
    skipped: int

    @property
    def median(self) -> float:
        return float(np.median(self.distances)) if self.distances else math.nan

    @property
    def p90(self) -> float:
        return float(np.percentile(self.distances, 90)) if self.distances else math.nan


class DlibReference:
    """dlib's face_recognition pipeline (HOG + 5-point predictor + ResNet), as face_recognition runs it."""

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as exc:
            raise ModelError("the dlib reference needs the dlib-bin wheel (pip install dlib-bin)") from exc
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self._encoder = dlib.face_recognition_model_v1(frm.face_recognition_model_location())

    def faces(self, image: np.ndarray) -> list[DlibFace]:
        out = []
        for rect in self._detector(image, 1):
            shape = self._shape(image, rect)
            details = self._dlib.get_face_chip_details(shape, 150, 0.25)
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            out.append(DlibFace(box, _image_to_chip(details), shape))
        return out

    def embed(self, image: np.ndarray, face: DlibFace) -> np.ndarray:
        return np.asarray(self._encoder.compute_face_descriptor(image, face.shape), dtype=np.float32)


def _image_to_chip(details: object) -> np.ndarray:
    """dlib maps chip corners tl, tr, bl onto the chip rectangle's corners rotated about its centre."""
    rect, angle = details.rect, details.angle  # type: ignore[attr-defined]
    rows, cols = details.rows, details.cols  # type: ignore[attr-defined]
    cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
    c, s = math.cos(angle), math.sin(angle)

    def rot(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return (c * dx - s * dy + cx, s * dx + c * dy + cy)

    chip = np.array([[0, 0], [cols - 1, 0], [0, rows - 1]], dtype=np.float64)
    img = np.array([rot(rect.left(), rect.top()), rot(rect.right(), rect.top()), rot(rect.left(), rect.bottom())])
    import cv2

    return cv2.getAffineTransform(img.astype(np.float32), chip.astype(np.float32)).astype(np.float64)


def _match(box: tuple[float, float, float, float], candidates: list) -> int | None:
    """Index of the candidate whose box centre lies inside `box` and is nearest to its centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    best, best_d = None, math.inf
    for i, (b, _) in enumerate(candidates):
        bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        if box[0] <= bx <= box[2] and box[1] <= by <= box[3]:
            d = math.hypot(bx - cx, by - cy)
            if d < best_d:
                best, best_d = i, d
    return best


def fit_template(images: Iterable[Path], landmarker: Landmarker, reference: DlibReference) -> TemplateFit:
    points = []
    for path in images:
        image = load_image(path)
        ours = landmarker(image)
        for face in reference.faces(image):
            j = _match(face.box, ours)
            if j is None:
                continue
            lm = np.asarray(ours[j][1], dtype=np.float64)
            points.append(lm @ face.image_to_chip[:, :2].T + face.image_to_chip[:, 2])
    if not points:
        raise ModelError("no face was found by both dlib and our detector; cannot fit a template")
    stack = np.stack(points)
    template = np.median(stack, axis=0)
    spread = np.median(np.abs(stack - template), axis=0).mean(axis=1)
    log.info("alignment template fitted on %d faces", len(points))
    return TemplateFit(template, len(points), spread)


def compare_with_dlib(
    images: Iterable[Path],
    embed_ours: Callable[[np.ndarray], list[tuple[tuple[float, float, float, float], np.ndarray]]],
    reference: DlibReference,
    progress: Callable[[int], None] | None = None,
) -> PipelineAgreement:
    """Distance between our embedding and dlib's for the same face in each image (faces both pipelines find)."""
    distances, n, skipped = [], 0, 0
    for path in images:
        n += 1
        image = load_image(path)
        ours = embed_ours(image)
        matched = False
        for face in reference.faces(image):
            j = _match(face.box, ours)
            if j is not None:
                distances.append(float(np.linalg.norm(ours[j][1] - reference.embed(image, face))))
                matched = True
        skipped += not matched
        if progress:
            progress(n)
    return PipelineAgreement(tuple(distances), n, skipped)
