"""5-point face alignment onto dlib's 150x150 chip geometry.

The detector's five landmarks (eye centres, nose tip, mouth corners) are not the points dlib's 5-point shape
predictor marks (eye corners, base of the nose), so dlib's own chip template cannot be used directly. TEMPLATE
holds where our five landmarks land, on average, inside the chips dlib itself cuts with
`get_face_chip_details(shape, 150, 0.25)`: it was measured on the development face set by mapping each face's
RetinaFace landmarks through dlib's image-to-chip transform (`model-tool fit-alignment`, see
models/template_fit.py). A least-squares similarity transform onto it then reproduces dlib's crops.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.errors import ImageError

CHIP_SIZE = 150

# (x, y) in a 150x150 chip, in LANDMARK_NAMES order (image-left eye, image-right eye, nose, mouth corners).
TEMPLATE = np.array(
    [
        [46.54, 44.43],
        [100.07, 43.72],
        [73.02, 77.95],
        [49.77, 99.14],
        [96.64, 99.12],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points onto dst (Umeyama).

    Returns the 2x3 matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s < 1e-12:
        raise ImageError("degenerate landmarks: all points coincide")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def align_face(
    image: np.ndarray, landmarks: np.ndarray, template: np.ndarray = TEMPLATE, size: int = CHIP_SIZE
) -> np.ndarray:
    """Cut the size x size chip for one face from an RGB image, given its five landmarks in image pixels."""
    m = similarity_transform(landmarks, template * (size / CHIP_SIZE))
    src = image
    # Like dlib's extract_image_chip: when the chip would shrink the face by more than 2x, sample from a
    # Gaussian pyramid level instead, so that large faces are not aliased by bilinear sampling.
    scale = float(np.hypot(m[0, 0], m[0, 1]))
    while scale < 0.5 and min(src.shape[:2]) >= 4:
        src = cv2.pyrDown(src)
        m[:, :2] *= 2.0
        scale *= 2.0
    return cv2.warpAffine(
        src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )


def align_faces(image: np.ndarray, landmarks: list[np.ndarray], size: int = CHIP_SIZE) -> np.ndarray:
    """Chips for several faces of one image, stacked as N x size x size x 3 uint8."""
    out = np.empty((len(landmarks), size, size, 3), dtype=np.uint8)
    for i, pts in enumerate(landmarks):
        out[i] = align_face(image, pts, size=size)
    return out
