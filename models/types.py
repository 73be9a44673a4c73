"""Plain data passed between the detector, aligner, encoder and matcher."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Landmark order as RetinaFace emits it, named by image side (the subject's right eye is on the image's left).
LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class Detection:
    """One face found in an image, in the original image's pixel coordinates."""

    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    landmarks: tuple[tuple[float, float], ...]  # 5 (x, y) points in LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    def landmarks_array(self) -> np.ndarray:
        return np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)

    def to_json(self) -> dict:
        return {
            "bbox": [round(v, 2) for v in self.bbox],
            "score": round(self.score, 5),
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
        }


@dataclass(frozen=True)
class FaceEmbedding:
    """A detected face and its 128-d encoding (dlib metric space: Euclidean, same person when d <= ~0.6)."""

    detection: Detection
    embedding: np.ndarray  # float32, shape (dim,)

    def to_json(self) -> dict:
        out = self.detection.to_json()
        out["embedding"] = [round(float(v), 6) for v in self.embedding]
        return out
