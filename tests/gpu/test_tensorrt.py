"""TensorRT (FP16) against ONNX Runtime (FP32 CPU) on a real GPU; skipped without TensorRT + CUDA (conftest).

`pytest -s tests/gpu` also prints per-batch latencies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.backends import create_backend
from models.backends.base import InferenceBackend, ShapeProfile
from models.backends.tensorrt_backend import TensorRTBackend
from models.face.encoders import encoder_onnx_path
from models.registry import detector_onnx_bytes

pytestmark = pytest.mark.gpu

DETECTOR_PROFILE = ShapeProfile((1, 3, 160, 160), (1, 3, 480, 640), (4, 3, 480, 640))
ENCODER_PROFILE = ShapeProfile((1, 3, 150, 150), (8, 3, 150, 150), (32, 3, 150, 150))
TOL = 1e-2  # FP16 engine vs FP32 reference


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def detector_trt(engine_cache: Path) -> Iterator[TensorRTBackend]:
    with TensorRTBackend(detector_onnx_bytes(), label="detector", profile=DETECTOR_PROFILE, cache=engine_cache) as b:
        yield b


@pytest.fixture(scope="module")
def encoder_onnx() -> bytes:
    return encoder_onnx_path().read_bytes()


@pytest.fixture(scope="module")
def encoder_trt(engine_cache: Path, encoder_onnx: bytes) -> Iterator[TensorRTBackend]:
    with TensorRTBackend(encoder_onnx, label="encoder", profile=ENCODER_PROFILE, cache=engine_cache) as b:
        yield b


def astronaut_batch() -> np.ndarray:
    """skimage's astronaut as the detector wants it: BGR, 480x640, minus the (104, 117, 123) mean, NCHW."""
    from skimage import data

    bgr = np.ascontiguousarray(data.astronaut()[:, :, ::-1]).astype(np.float32)
    bgr = cv2.resize(bgr, (640, 480), interpolation=cv2.INTER_LINEAR) - np.array([104, 117, 123], np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


def random_chips(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, 150, 150)).astype(np.float32)


def latency_ms(backend: InferenceBackend, batch: np.ndarray, repeats: int = 20) -> float:
    for _ in range(3):  # warm-up: first calls pay for lazy allocations and clock ramp-up
        backend.run(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        backend.run(batch)
    return (time.perf_counter() - started) / repeats * 1e3


def test_detector_matches_onnxruntime(detector_trt: TensorRTBackend) -> None:
    x = astronaut_batch()
    ref = create_backend("onnxruntime", detector_onnx_bytes(), label="detector").run(x)
    got = detector_trt.run(x)
    assert detector_trt.output_names == ("loc", "conf", "landmarks")
    assert [g.shape for g in got] == [r.shape for r in ref]
    loc, conf, landmarks = ref
    # Scores are probabilities: compared everywhere.
    assert np.abs(got[1] - conf).max() <= TOL
    # Box and landmark regressions are only decoded where a face is scored; on background anchors they are
    # large and meaningless and FP16 activations move them by a few 1e-2, so they get a scale-relative bound.
    faces = conf[0, :, 1] > 0.5
    assert faces.any(), "the astronaut's face should be detected"
    for g, r in ((got[0], loc), (got[2], landmarks)):
        assert np.abs(g[0][faces] - r[0][faces]).max() <= TOL
        assert np.abs(g - r).max() <= 5 * TOL * np.abs(r).max()


@pytest.mark.parametrize("n", [1, 8])
def test_encoder_matches_onnxruntime(encoder_trt: TensorRTBackend, encoder_onnx: bytes, n: int) -> None:
    chips = random_chips(n, seed=n)
    (ref,) = create_backend("onnxruntime", encoder_onnx, label="encoder").run(chips)
    (got,) = encoder_trt.run(chips)
    assert got.shape == ref.shape == (n, 128)
    assert np.abs(got - ref).max() <= TOL
    assert np.linalg.norm(got - ref, axis=1).max() <= 2 * TOL  # far below dlib's 0.6 match threshold


def test_batch_sizes_across_the_profile(detector_trt: TensorRTBackend, encoder_trt: TensorRTBackend) -> None:
    chips = random_chips(32, seed=3)
    (full,) = encoder_trt.run(chips)
    for n in (1, 2, 7, 8, 31, 32):  # smaller batches reuse the max-size buffers and must agree row for row
        (part,) = encoder_trt.run(chips[:n])
        assert part.shape == (n, 128)
        assert np.abs(part - full[:n]).max() <= TOL
    for shape in [(1, 3, 160, 160), (2, 3, 320, 480), (4, 3, 480, 640), (3, 3, 480, 320)]:  # dynamic H/W too
        outs = detector_trt.run(np.zeros(shape, np.float32))
        assert [o.shape[0] for o in outs] == [shape[0]] * 3


def test_engine_cache_hit(detector_trt: TensorRTBackend, engine_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="models.backends.tensorrt_backend")
    with TensorRTBackend(detector_onnx_bytes(), label="detector", profile=DETECTOR_PROFILE, cache=engine_cache) as b:
        assert b.cache_hit
        assert b.engine_path == detector_trt.engine_path
    messages = [r.getMessage() for r in caplog.records]
    assert any("loaded TensorRT engine from cache" in m for m in messages)
    assert not any("building TensorRT" in m for m in messages)


def test_print_latencies(detector_trt: TensorRTBackend, encoder_trt: TensorRTBackend) -> None:
    for n in (1, 8, 32):
        ms = latency_ms(encoder_trt, random_chips(n))
        print(f"\nencoder TensorRT fp16 batch {n:2d}: {ms:7.2f} ms ({ms / n:6.2f} ms/face)")
    for n in (1, 4):
        ms = latency_ms(detector_trt, np.repeat(astronaut_batch(), n, axis=0))
        print(f"\ndetector TensorRT fp16 480x640 batch {n}: {ms:7.2f} ms")


def test_the_mobilefacenet_option_matches_onnxruntime(engine_cache: Path, mobilefacenet) -> None:  # type: ignore[no-untyped-def]
    """The converted TFLite graph (Relu + slope * Min PReLUs, dynamic batch) as a TensorRT fp16 engine."""
    from models.face.encoder import encoder_profile

    onnx = encoder_onnx_path(mobilefacenet).read_bytes()
    chips = np.random.default_rng(5).uniform(0, 255, (8, 3, 112, 112)).astype(np.float32)
    (ref,) = create_backend("onnxruntime", onnx, label="mobilefacenet").run(chips)
    profile = encoder_profile(mobilefacenet)
    with TensorRTBackend(onnx, label="mobilefacenet", profile=profile, cache=engine_cache) as trt:
        (got,) = trt.run(chips)
        ms = latency_ms(trt, chips)
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731 - the encoder L2-normalises
    assert got.shape == ref.shape == (8, 192)
    assert np.linalg.norm(unit(got) - unit(ref), axis=1).max() <= 2 * TOL  # far below its 0.92 threshold
    print(f"\nmobilefacenet-192 TensorRT fp16 batch 8: {ms:7.2f} ms ({ms / 8:6.2f} ms/face)")
