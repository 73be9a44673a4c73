"""Build (or find in the cache) the TensorRT engines of every model, on the device that will run them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from models.backends import create_backend
from models.face.detector import DetectorConfig, detector_profile
from models.face.encoder import encoder_profile
from models.face.encoders import DLIB_RESNET, EncoderSpec, encoder_onnx_path
from models.registry import DETECTOR, detector_onnx_bytes

log = logging.getLogger(__name__)


def build_engines(
    *, precision: str = "fp16", max_batch: int = 32, max_side: int = 640, encoder: EncoderSpec = DLIB_RESNET
) -> Iterator[dict]:
    """One record per model (the detector and `encoder`): where its engine is and whether it was already cached.
    Idempotent."""
    plans = (
        (DETECTOR.name, detector_onnx_bytes(), detector_profile(DetectorConfig(max_side=max_side), min(max_batch, 8))),
        (encoder.manifest.name, encoder_onnx_path(encoder), encoder_profile(encoder, max_batch)),
    )
    for name, onnx, profile in plans:
        log.info("%s: TensorRT engine for profile %s (%s)", name, profile.key(), precision)
        t0 = time.perf_counter()
        backend = create_backend("tensorrt", onnx, label=name, profile=profile, precision=precision)
        try:
            yield {
                "model": name,
                "precision": precision,
                "profile": profile.key(),
                "engine": str(getattr(backend, "engine_path", "")),
                "cached": bool(getattr(backend, "cache_hit", False)),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        finally:
            backend.close()
