"""Shared fixtures, and the gate that skips `@pytest.mark.gpu` tests where TensorRT cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.backends import tensorrt_available


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # don't touch CUDA when no GPU test was selected
    ok, reason = tensorrt_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"gpu test needs tensorrt, pycuda and a CUDA device: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $FACEATTEND_CACHE for this test, so generated artefacts never land in the user's cache."""
    root = tmp_path / "faceattend-cache"
    monkeypatch.setenv("FACEATTEND_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def detector_onnx() -> bytes:
    from models.registry import detector_onnx_bytes

    return detector_onnx_bytes()
