"""Face alignment: each encoder's chips cut the way its training data was cut.

For dlib's encoder, two methods onto dlib's 150x150 chip geometry, both ending in the same warp:

- ``dlib5`` (default): the chip dlib itself would cut. Our detector's box and landmarks predict the rect dlib's
  HOG detector would have given (a small linear model fitted on the development set), dlib's own 5-point shape
  predictor (an ERT cascade, reimplemented in numpy: models/face/dlib_shape.py) refines the eye corners and nose from
  it, and `get_face_chip_details(shape, 150, 0.25)`'s similarity maps them onto the chip. The embedding is so
  sensitive to the crop (a 1 px shift of dlib's own chip moves it by 0.07) that only dlib's own landmarks bring
  our embeddings close to dlib's: median distance 0.045 on the development set (see `model-tool fit-alignment`).
- ``template``: a least-squares similarity from the detector's five landmarks (eye centres, nose tip, mouth
  corners) onto TEMPLATE, where those landmarks land on average inside dlib's chips (the per-landmark median
  over the development set, measured by `model-tool fit-alignment` through dlib's image-to-chip transform).
  Cheaper (no cascade) but its crops differ from dlib's by a pixel or two: median distance 0.15 to dlib's
  embeddings.

For the 112x112 ArcFace-family encoders (MobileFaceNet):

- ``arcface112``: a least-squares similarity from the detector's five landmarks onto ARCFACE_112, the reference
  points InsightFace's training crops were aligned to (no padding), as those encoders' authors align.

The method is part of the encoder fingerprint: embeddings made under different methods are not mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import cv2
import numpy as np

from models.errors import ConfigError, ImageError
from models.types import Detection

CHIP_SIZE: Final[int] = 150  # dlib's chip
CHIP_PADDING: Final[float] = 0.25  # dlib's get_face_chip_details padding for its face recognition model
CHIP_SIZES: Final[dict[str, int]] = {"dlib5": CHIP_SIZE, "template": CHIP_SIZE, "arcface112": 112}
METHODS: Final[tuple[str, ...]] = tuple(CHIP_SIZES)
DEFAULT_METHOD: Final[str] = "dlib5"

# (x, y) in a 150x150 chip, in LANDMARK_NAMES order (image-left eye, image-right eye, nose, mouth corners).
TEMPLATE: Final[np.ndarray] = np.array(
    [
        [46.63, 44.41],
        [100.69, 44.01],
        [73.10, 77.93],
        [49.40, 99.35],
        [97.11, 99.75],
    ],
    dtype=np.float64,
)
TEMPLATE.setflags(write=False)

# (x, y) in a 112x112 chip, same landmark order: InsightFace's reference points for its 112x112 training crops
ARCFACE_112: Final[np.ndarray] = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_112.setflags(write=False)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points onto dst, as a 2x3
    matrix M with dst ~= M @ [x, y, 1] (dlib's find_similarity_transform, Umeyama)."""
    from models.face.dlib_shape import find_similarity_transform

    src = np.asarray(src, dtype=np.float64)
    if ((src - src.mean(axis=0)) ** 2).sum() < 1e-12:
        raise ImageError("degenerate landmarks: all points coincide")
    m, t = find_similarity_transform(src, dst)
    return np.hstack([m, t.reshape(2, 1)])


def warp_chip(image: np.ndarray, image_to_chip: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """Cut a size x size chip with a 2x3 image-to-chip similarity.

    Like dlib's extract_image_chip, a chip that would shrink the face by more than 2x samples from a Gaussian
    pyramid level instead, so that large faces are not aliased by bilinear sampling.
    """
    m = np.array(image_to_chip, dtype=np.float64)
    src = image
    scale = float(np.hypot(m[0, 0], m[0, 1]))
    while scale < 0.5 and min(src.shape[:2]) >= 4:
        src = cv2.pyrDown(src)
        m[:, :2] *= 2.0
        scale *= 2.0
    return cv2.warpAffine(
        src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )


def dlib5_transform(image: np.ndarray, detection: Detection, size: int = CHIP_SIZE) -> np.ndarray:
    """The image-to-chip similarity dlib would use for this face (see the module doc)."""
    from models.face.dlib_shape import dlib_chip_transform, predict_5, rect_from_detection

    rect = rect_from_detection(detection.bbox, detection.landmarks_array())
    return dlib_chip_transform(predict_5(image, rect), size, CHIP_PADDING)


def template_transform(detection: Detection, size: int = CHIP_SIZE) -> np.ndarray:
    return similarity_transform(detection.landmarks_array(), TEMPLATE * (size / CHIP_SIZE))


def arcface_transform(detection: Detection) -> np.ndarray:
    return similarity_transform(detection.landmarks_array(), ARCFACE_112)


class Aligner:
    """Cuts encoder chips for detected faces with one alignment method, at that method's chip size."""

    def __init__(self, method: str = DEFAULT_METHOD) -> None:
        if method not in METHODS:
            raise ConfigError(f"alignment method {method!r} is not one of {', '.join(METHODS)}")
        self.method = method
        self.size = CHIP_SIZES[method]

    def transform(self, image: np.ndarray, detection: Detection) -> np.ndarray:
        if self.method == "dlib5":
            return dlib5_transform(image, detection, self.size)
        if self.method == "arcface112":
            return arcface_transform(detection)
        return template_transform(detection, self.size)

    def align(self, image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
        """Chips for every face of one image, stacked as N x size x size x 3 uint8."""
        out = np.empty((len(detections), self.size, self.size, 3), dtype=np.uint8)
        for i, det in enumerate(detections):
            out[i] = warp_chip(image, self.transform(image, det), self.size)
        return out
