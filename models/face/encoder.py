"""The 128-d face encoder: aligned 150x150 RGB chips in, dlib-metric embeddings out, in bounded batches."""

from __future__ import annotations

import logging

import numpy as np

from models.backends import create_backend
from models.backends.base import InferenceBackend, ShapeProfile
from models.errors import ImageError
from models.face.alignment import CHIP_SIZE
from models.registry import ENCODER, encoder_onnx_path

log = logging.getLogger(__name__)

EMBEDDING_DIM = 128
MAX_BATCH = 32


def encoder_profile(max_batch: int = MAX_BATCH) -> ShapeProfile:
    return ShapeProfile(
        (1, 3, CHIP_SIZE, CHIP_SIZE), (min(8, max_batch), 3, CHIP_SIZE, CHIP_SIZE), (max_batch, 3, CHIP_SIZE, CHIP_SIZE)
    )


class FaceEncoder:
    def __init__(self, backend: InferenceBackend, max_batch: int = MAX_BATCH) -> None:
        self._backend = backend
        self._max_batch = max_batch

    @classmethod
    def create(
        cls, backend: str = "onnxruntime", *, threads: int | None = None, max_batch: int = MAX_BATCH
    ) -> FaceEncoder:
        return cls(
            create_backend(
                backend, encoder_onnx_path(), label=ENCODER.name, profile=encoder_profile(max_batch), threads=threads
            ),
            max_batch,
        )

    @property
    def backend(self) -> InferenceBackend:
        return self._backend

    def encode(self, chips: np.ndarray) -> np.ndarray:
        """N x 150 x 150 x 3 uint8 RGB chips -> N x 128 float32 embeddings."""
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ImageError(f"encoder expects N x {CHIP_SIZE} x {CHIP_SIZE} x 3 chips, got {chips.shape}")
        out = np.empty((len(chips), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(chips), self._max_batch):
            part = chips[start : start + self._max_batch]
            batch = np.ascontiguousarray(part.transpose(0, 3, 1, 2), dtype=np.float32)
            out[start : start + len(part)] = self._backend.run(batch)[0]
        return out

    def close(self) -> None:
        self._backend.close()
