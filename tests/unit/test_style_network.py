"""The feed-forward style network: shapes, ONNX export (dynamic N/H/W) against torch, the numpy-only runtime,
and the TensorRT build path (fake TensorRT from test_backends) keeping instance norm in FP32."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_backends import FakeCuda, make_fake_trt

from models.backends import tensorrt_backend as trt_backend
from models.errors import ConfigError, ImageError, StyleError
from models.style.export import export_onnx
from models.style.runtime import FP32_LAYERS, StyleModelInfo, Stylizer, style_profile
from models.style.transformer import TransformerConfig, TransformerNet

TINY = TransformerConfig(width=4, residual_blocks=1)
INFO = StyleModelInfo("tiny", "0" * 64, 3, TINY.to_json(), {"alpha": 1.0}, {"undertrained": True})


@pytest.fixture(scope="module")
def tiny() -> TransformerNet:
    torch.manual_seed(0)
    return TransformerNet(TINY).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny: TransformerNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("style") / "tiny.onnx"
    path.write_bytes(export_onnx(tiny, INFO))
    return path


def test_transformer_keeps_the_size_and_the_range(tiny: TransformerNet):
    x = torch.rand(2, 3, 36, 52)
    with torch.no_grad():
        y = tiny(x)
    assert y.shape == x.shape
    assert y.min() > 0 and y.max() < 1


def test_transformer_config_is_validated():
    with pytest.raises(ConfigError):
        TransformerConfig(width=2)
    with pytest.raises(StyleError, match="malformed"):
        TransformerConfig.from_json({"width": 8})
    assert TransformerConfig.from_json(TINY.to_json()) == TINY


def test_onnx_matches_torch_on_dynamic_non_square_shapes(tiny: TransformerNet, tiny_onnx: Path):
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 48), (2, 3, 40, 64), (1, 3, 100, 20)]:
        x = np.random.default_rng(shape[2]).random(shape, dtype=np.float32)
        (got,) = session.run(None, {"image": x})
        with torch.no_grad():
            ref = tiny(torch.from_numpy(x)).numpy()
        assert got.shape == shape
        assert np.abs(got - ref).max() < 1e-5
    graph = onnx.load(str(tiny_onnx)).graph
    # three downsampling and two upsampling conv-IN, two per residual block; the last conv has none
    assert sum(n.op_type == "InstanceNormalization" for n in graph.node) == 3 + 2 + 2 * TINY.residual_blocks


def test_metadata_round_trips(tiny_onnx: Path, tmp_path: Path, detector_onnx: bytes):
    info = StyleModelInfo.from_onnx(tiny_onnx)
    assert info == INFO and info.undertrained is True
    with pytest.raises(StyleError, match="no such"):
        StyleModelInfo.from_onnx(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all" * 3)
    with pytest.raises(StyleError, match="not an ONNX"):
        StyleModelInfo.from_onnx(tmp_path / "junk.onnx")
    (tmp_path / "detector.onnx").write_bytes(detector_onnx)
    with pytest.raises(StyleError, match="not a faceattend style model"):
        StyleModelInfo.from_onnx(tmp_path / "detector.onnx")


def test_stylizer_bgr_in_bgr_out_any_size(tiny: TransformerNet, tiny_onnx: Path, caplog: pytest.LogCaptureFixture):
    rng = np.random.default_rng(0)
    with Stylizer.from_onnx(tiny_onnx, threads=1, max_side=64) as s:
        assert "undertrained" in caplog.text
        odd = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # padded to 40 x 56 inside, cropped back
        out = s.stylize(odd)
        assert out.shape == odd.shape and out.dtype == np.uint8
        # BGR in, BGR out: the same as the network on the RGB image, channel-reversed
        with torch.no_grad():
            x = torch.from_numpy(np.pad(odd[:, :, ::-1], ((0, 3), (0, 3), (0, 0)), mode="reflect").copy())
            ref = tiny(x.permute(2, 0, 1)[None].float() / 255)[0, :, :37, :53].permute(1, 2, 0).numpy()
        ref_bgr = (ref * 255 + 0.5).astype(np.uint8)[:, :, ::-1]
        assert np.abs(out.astype(int) - ref_bgr.astype(int)).max() <= 1
        big = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)  # above max_side: stylised at 64, scaled back
        assert s.stylize(big).shape == big.shape
        for bad, message in [
            ([[1, 2, 3]], "numpy"),
            (np.zeros((20, 20), np.uint8), "H x W x 3"),
            (np.zeros((20, 20, 3), np.float32), "uint8"),
            (np.zeros((8, 40, 3), np.uint8), "too small"),
        ]:
            with pytest.raises(ImageError, match=message):
                s.stylize(bad)


def test_runtime_does_not_import_torch():
    code = (
        "import sys, models.style.runtime, models.style.procedural, models.style.images; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tensorrt_profile_covers_min_to_max_side():
    p = style_profile(1000)
    assert p.min_shape == (1, 3, 16, 16) and p.opt_shape == (1, 3, 512, 512) and p.max_shape == (1, 3, 1000, 1000)
    assert style_profile(250).max_shape == (1, 3, 252, 252) and style_profile(250).opt_shape == (1, 3, 252, 252)


def test_tensorrt_strongly_typed_build_keeps_instance_norm_in_fp32(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cuda = FakeCuda()
    trt = make_fake_trt("10.12.0.36", cuda)
    pycuda = type(sys)("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setattr(trt_backend, "_trt_logger_instance", None)
    monkeypatch.setenv("FACEATTEND_CACHE", str(tmp_path))
    with Stylizer.from_onnx(tiny_onnx, "tensorrt", max_side=64) as s:
        image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        with Stylizer.from_onnx(tiny_onnx, max_side=64) as reference:
            assert np.abs(s.stylize(image).astype(int) - reference.stylize(image).astype(int)).max() <= 3
    (build,) = trt.builds
    graph = build["model"].graph
    types = {t.name: t.data_type for t in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}  # deduplicated weights

    def weight_type(name: str) -> int:
        while name in aliases:
            name = aliases[name]
        return types[name]

    norms = [n for n in graph.node if n.op_type in FP32_LAYERS]
    assert len(norms) == 3 + 2 + 2 * TINY.residual_blocks
    for node in norms:  # scale and bias stay float32, the data input arrives through a Cast to float32
        assert weight_type(node.input[1]) == weight_type(node.input[2]) == onnx.TensorProto.FLOAT
        assert node.input[0].endswith("__fp32")
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert {weight_type(n.input[1]) for n in convs} == {onnx.TensorProto.FLOAT16}
