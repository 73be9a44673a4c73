"""Our ONNX conversion of dlib's face encoder against dlib itself, on real aligned chips cut by dlib."""

from __future__ import annotations

from pathlib import Path

import dlib
import face_recognition_models
import facesets
import numpy as np
import pytest

from models import registry
from models.backends.onnxruntime_backend import OnnxRuntimeBackend
from models.face import encoders
from models.face.dlib_onnx import convert_dlib_bytes

NUM_CHIPS = 12
PER_IDENTITY = 2
TOLERANCE = 1e-4  # max |ours - dlib| per embedding component


def _largest_face_chip(detector, predictor, path: Path) -> np.ndarray | None:
    img = dlib.load_rgb_image(str(path))
    faces = detector(img, 0) or detector(img, 1)  # upsample only when the face is too small to find otherwise
    if not faces:
        return None
    face = max(faces, key=lambda r: r.area())
    return dlib.get_face_chip(img, predictor(img, face), 150, 0.25)


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    """12 aligned 150x150 RGB uint8 chips of the test face set, two per person, in a fixed order."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    out: list[np.ndarray] = []
    for person in facesets.people():
        taken = 0
        for path in facesets.photos(person):
            if taken == PER_IDENTITY or len(out) == NUM_CHIPS:
                break
            chip = _largest_face_chip(detector, predictor, path)
            if chip is not None:
                out.append(chip)
                taken += 1
        if len(out) == NUM_CHIPS:
            break
    assert len(out) == NUM_CHIPS, f"dlib found only {len(out)} faces in the test face set"
    return np.stack(out)


@pytest.fixture(scope="module")
def reference(chips: np.ndarray) -> np.ndarray:
    facerec = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
    return np.stack([np.asarray(facerec.compute_face_descriptor(chip), dtype=np.float32) for chip in chips])


@pytest.fixture(scope="module")
def backend():
    with OnnxRuntimeBackend(convert_dlib_bytes(registry.read_verified(registry.DLIB_ENCODER)), label="encoder") as b:
        yield b


def _nchw(chips: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(chips.transpose(0, 3, 1, 2), dtype=np.float32)


def test_chips_are_aligned_rgb(chips: np.ndarray) -> None:
    assert chips.shape == (NUM_CHIPS, 150, 150, 3)
    assert chips.dtype == np.uint8


def test_embeddings_match_dlib(backend: OnnxRuntimeBackend, chips: np.ndarray, reference: np.ndarray) -> None:
    (ours,) = backend.run(_nchw(chips))
    assert ours.shape == (NUM_CHIPS, 128)
    assert ours.dtype == np.float32
    diff = np.abs(ours - reference)
    assert diff.max() <= TOLERANCE, f"max |diff| {diff.max():.3g} at chip {np.unravel_index(diff.argmax(), diff.shape)}"


def test_embeddings_are_not_degenerate(reference: np.ndarray) -> None:
    # guards the parity test against comparing two constant outputs: the chips are distinct people
    norms = np.linalg.norm(reference, axis=1)
    assert np.all(norms > 0.1)
    distances = np.linalg.norm(reference[:, None] - reference[None], axis=-1)
    assert distances[~np.eye(NUM_CHIPS, dtype=bool)].min() > 0.05


def test_batch_of_8_equals_batch_of_1(backend: OnnxRuntimeBackend, chips: np.ndarray, reference: np.ndarray) -> None:
    batch = _nchw(chips[:8])
    (batched,) = backend.run(batch)
    singles = np.concatenate([backend.run(batch[i : i + 1])[0] for i in range(8)])
    assert batched.shape == singles.shape == (8, 128)
    assert np.abs(batched - singles).max() <= TOLERANCE
    assert np.abs(singles - reference[:8]).max() <= TOLERANCE


def test_registry_caches_the_same_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEATTEND_CACHE", str(tmp_path))
    encoders.encoder_onnx_path.cache_clear()
    try:
        path = encoders.encoder_onnx_path()
        assert path.is_relative_to(tmp_path)
        assert path.read_bytes() == convert_dlib_bytes(registry.read_verified(registry.DLIB_ENCODER))
    finally:
        encoders.encoder_onnx_path.cache_clear()
