"""The style network on TensorRT (FP16, instance norm kept in FP32) against ONNX Runtime; skipped without
TensorRT + CUDA (conftest). `pytest -s tests/gpu` also prints the ms per 512x512 image."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.style.export import export_onnx
from models.style.runtime import StyleModelInfo, Stylizer
from models.style.transformer import TransformerConfig, TransformerNet

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def style_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = TransformerConfig()
    path = tmp_path_factory.mktemp("style") / "style.onnx"
    path.write_bytes(
        export_onnx(TransformerNet(config).eval(), StyleModelInfo("gpu-test", "", 0, config.to_json(), {}))
    )
    return path


def _photo(h: int, w: int) -> np.ndarray:
    import cv2
    from skimage import data

    return cv2.resize(np.ascontiguousarray(data.astronaut()[:, :, ::-1]), (w, h), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_matches_onnxruntime(style_onnx: Path, precision: str, cache_root: Path) -> None:
    with (
        Stylizer.from_onnx(style_onnx, "tensorrt", max_side=512, precision=precision) as trt,
        Stylizer.from_onnx(style_onnx, "onnxruntime", threads=4, max_side=512) as ort,
    ):
        for h, w in [(512, 512), (300, 452), (64, 200)]:  # dynamic, non-square, padded to multiples of 4
            image = _photo(h, w)
            got, ref = trt.stylize(image).astype(int), ort.stylize(image).astype(int)
            assert got.shape == ref.shape == image.shape
            diff = np.abs(got - ref)
            assert diff.mean() < 1.0 and diff.max() <= (12 if precision == "fp16" else 2)


def test_print_latency(style_onnx: Path, cache_root: Path) -> None:
    image = _photo(512, 512)
    with Stylizer.from_onnx(style_onnx, "tensorrt", max_side=512) as trt:
        for _ in range(3):
            trt.stylize(image)
        started = time.perf_counter()
        for _ in range(20):
            trt.stylize(image)
        print(f"\nstyle network TensorRT fp16 (IN fp32) 512x512: {(time.perf_counter() - started) / 20 * 1e3:.2f} ms")
