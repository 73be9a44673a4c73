"""The face encoder: aligned RGB chips in, embeddings in the encoder's own metric space out, in bounded batches.

Which encoder, its chip size, dimension and normalisation come from its EncoderSpec (models/face/encoders.py).
"""

from __future__ import annotations

import logging

import numpy as np

from models.backends import create_backend
from models.backends.base import InferenceBackend, ShapeProfile
from models.errors import ImageError
from models.face.encoders import DLIB_RESNET, EncoderSpec, encoder_onnx_path

log = logging.getLogger(__name__)

MAX_BATCH = 32


def encoder_profile(spec: EncoderSpec = DLIB_RESNET, max_batch: int = MAX_BATCH) -> ShapeProfile:
    size = spec.chip_size
    return ShapeProfile((1, 3, size, size), (min(8, max_batch), 3, size, size), (max_batch, 3, size, size))


class FaceEncoder:
    def __init__(self, backend: InferenceBackend, spec: EncoderSpec = DLIB_RESNET, max_batch: int = MAX_BATCH) -> None:
        self._backend = backend
        self.spec = spec
        self._max_batch = max_batch

    @classmethod
    def create(
        cls,
        spec: EncoderSpec = DLIB_RESNET,
        backend: str = "onnxruntime",
        *,
        threads: int | None = None,
        max_batch: int = MAX_BATCH,
    ) -> FaceEncoder:
        onnx = encoder_onnx_path(spec)
        profile = encoder_profile(spec, max_batch)
        return cls(
            create_backend(backend, onnx, label=spec.manifest.name, profile=profile, threads=threads), spec, max_batch
        )

    @property
    def backend(self) -> InferenceBackend:
        return self._backend

    def encode(self, chips: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 RGB chips (S: the spec's chip size) -> N x dim float32 embeddings."""
        size = self.spec.chip_size
        if chips.ndim != 4 or chips.shape[1:] != (size, size, 3):
            raise ImageError(f"encoder {self.spec.name} expects N x {size} x {size} x 3 chips, got {chips.shape}")
        out = np.empty((len(chips), self.spec.dim), dtype=np.float32)
        for start in range(0, len(chips), self._max_batch):
            part = chips[start : start + self._max_batch]
            batch = np.ascontiguousarray(part.transpose(0, 3, 1, 2), dtype=np.float32)
            out[start : start + len(part)] = self._backend.run(batch)[0]
            if self.spec.flip_average:
                mirrored = np.ascontiguousarray(batch[..., ::-1])  # NCHW: the last axis is the chip's width
                out[start : start + len(part)] += self._backend.run(mirrored)[0]
                out[start : start + len(part)] *= 0.5
        if self.spec.normalisation == "l2":
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            # a zero vector stays zero (never NaN): it is far from every unit template, so it is never accepted
            np.divide(out, norms, out=out, where=norms > 0)
        return out

    def close(self) -> None:
        self._backend.close()
