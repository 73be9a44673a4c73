"""Style transfer with the real MobileNetV2 weights and real images, in short runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skimage_data

from models import registry
from models.cli.model_tool import EXIT_FATAL, EXIT_OK, main
from models.errors import StyleError
from models.imageio import load_image
from models.style.images import load_style, resize_long_side
from models.style.lossnet import CONTENT_LAYER, STYLE_LAYERS, LossNetwork, imagenet_normalise, load_mobilenet_v2
from models.style.optimize import OptimizeConfig, stylize_optimize, to_tensor
from models.style.runtime import Stylizer
from models.style.train import TrainConfig, heldout_report, load_checkpoint, split_holdout, train_style
from models.style.transformer import TransformerConfig


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone():
    return load_mobilenet_v2()


@pytest.fixture(scope="module")
def lossnet(backbone) -> LossNetwork:
    return LossNetwork(backbone, (*STYLE_LAYERS, CONTENT_LAYER))


def test_weights_are_the_pinned_torchvision_checkpoint():
    data = registry.read_verified(registry.STYLE_LOSS_NETWORK)
    assert registry.sha256_bytes(data).startswith("b0353104")  # torchvision names its files by this prefix
    assert len(data) == 14_212_972


def test_real_weights_classify_a_cat_as_a_cat(backbone):
    x = to_tensor(skimage_data.chelsea())
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = backbone(imagenet_normalise(x)).softmax(dim=1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"chelsea classified as ImageNet class {top}"  # tabby .. Egyptian cat
    assert float(probs[281:286].sum()) > 0.8


def test_taps_are_post_relu6_expansion_activations(lossnet):
    with torch.no_grad():
        acts = lossnet(torch.rand(1, 3, 64, 96))
    expected = {
        "features.0": (32, 2),
        "features.2.conv.0": (96, 2),
        "features.4.conv.0": (144, 4),
        "features.7.conv.0": (192, 8),
        "features.11.conv.0": (384, 16),
    }
    for name, (channels, stride) in expected.items():
        a = acts[name]
        assert a.shape == (1, channels, 64 // stride, 96 // stride)
        assert a.min() >= 0 and a.max() <= 6  # after ReLU6
    with pytest.raises(StyleError, match="unknown loss-network layer"):
        LossNetwork(load_mobilenet_v2(pretrained=False), ("features.99",))


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_optimiser_lowers_the_cost(lossnet, method: str):
    content = skimage_data.chelsea()
    style, _ = load_style("procedural:swirl")
    config = OptimizeConfig(size=64, iterations=30, method=method, adam_lr=0.05)
    result = stylize_optimize(content, style, config, lossnet=lossnet)
    assert result.start["style"] == pytest.approx(1.0, rel=1e-4) and result.start["content"] == 0  # G starts at C
    assert result.end["total"] < 0.5 * result.start["total"]
    assert result.image.shape == (43, 64, 3) and result.image.dtype == np.uint8
    assert len(result.history) >= 30 and result.evaluations == len(result.history)
    assert config.scales() == (64,) and OptimizeConfig(size=512).scales() == (256, 512)


def _contents() -> list[tuple[str, np.ndarray]]:
    names = ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field")
    return [(n, np.ascontiguousarray(getattr(skimage_data, n)()[:, :, :3])) for n in names]


def test_short_cpu_training_learns_the_palette_and_resumes(tmp_path: Path):
    style, label = load_style("procedural:mosaic", size=128)
    train_items, heldout = split_holdout(_contents(), 1, seed=0)
    assert len(train_items) == 4 and len(heldout) == 1
    ckpt = tmp_path / "mosaic.ckpt"
    tiny = TransformerConfig(width=8, residual_blocks=1)
    config = TrainConfig(
        size=64, batch_size=2, iterations=100, lr=5e-3, style_size=128, checkpoint_every=50, transformer=tiny
    )
    result = train_style(config, style, label, train_items, ckpt)
    styles = [h[3] for h in result.state.history]
    assert len(styles) == 100 and np.mean(styles[-5:]) < 0.5 * np.mean(styles[:5])
    report = heldout_report(
        result.model, style, result.state.weights, heldout, size=64, style_size=128, optimizer_iterations=10
    )
    assert report.images == 1 and report.palette_progress > 0.3  # the mean colour moved toward the style's
    assert report.model_style > 0 and report.optimizer_style > 0 and isinstance(report.undertrained, bool)
    assert "held-out images the network's style loss" in report.verdict()

    # resume to 105: the iteration count and history continue; another style is refused
    resumed = train_style(
        TrainConfig(**{**config.__dict__, "iterations": 105}), style, label, train_items, ckpt, resume=True
    )
    assert resumed.iterations_run == 5 and resumed.state.iteration == 105 and len(resumed.state.history) == 105
    assert load_checkpoint(ckpt)["iteration"] == 105
    other, other_label = load_style("procedural:swirl", size=128)
    with pytest.raises(StyleError, match="trained for style"):
        train_style(config, other, other_label, train_items, ckpt, resume=True)


def test_cli_train_export_and_run_the_network(capsys, tmp_path: Path):
    ckpt, onnx_path = tmp_path / "s.ckpt", tmp_path / "s.onnx"
    code = main(
        [
            "train-style",
            "--style",
            "procedural:swirl",
            "--skimage-samples",
            "--checkpoint",
            str(ckpt),
            "--onnx",
            str(onnx_path),
            "--size",
            "64",
            "--batch-size",
            "2",
            "--iterations",
            "6",
            "--width",
            "8",
            "--residual-blocks",
            "1",
            "--holdout",
            "1",
            "--check-iterations",
            "5",
            "--check-size",
            "64",
            "--grid",
            str(tmp_path / "heldout.png"),
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == EXIT_OK
    record = json.loads(captured.out.splitlines()[-1])
    assert record["iterations"] == 6 and record["heldout"]["images"] == 1
    assert record["heldout"]["undertrained"] is True  # 6 steps, and a 5-evaluation reference: never "trained"
    assert "UNDERTRAINED (not certified" in captured.err and "held-out images the network's style" in captured.err
    assert load_image(tmp_path / "heldout.png").shape[1] > 3 * 64

    # the exported ONNX against the checkpoint's torch network, on a non-square image
    from models.style.train import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ckpt))
    x = np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.no_grad():
        assert np.abs(got - model(torch.from_numpy(x)).numpy()).max() < 1e-5
    with Stylizer.from_onnx(onnx_path) as s:
        assert s.info.iterations == 6 and s.info.heldout is not None
        photo = np.ascontiguousarray(skimage_data.astronaut()[::4, ::4, ::-1])
        assert s.stylize(photo).shape == photo.shape

    code = main(["export-style", "--checkpoint", str(ckpt), "--out", str(tmp_path / "again.onnx")])
    assert code == EXIT_OK and json.loads(capsys.readouterr().out)["iterations"] == 6


def test_cli_stylize_optimiser_mode(capsys, tmp_path: Path):
    content = tmp_path / "cat.png"
    from models.face.drawing import write_png

    write_png(content, skimage_data.chelsea())
    out, grid = tmp_path / "g.png", tmp_path / "grid.png"
    code = main(
        [
            "stylize",
            "--content",
            str(content),
            "--style",
            "procedural:swirl",
            "--out",
            str(out),
            "--grid",
            str(grid),
            "--size",
            "64",
            "--iterations",
            "10",
            "--quiet",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and record["mode"] == "optimiser"
    assert record["J_end"]["total"] < record["J_start"]["total"]
    assert load_image(out).shape == (43, 64, 3) and load_image(grid).shape[1] > 150


@pytest.mark.parametrize(("model", "layer", "field"), [("style", "features.0", 3), ("face", "l2_relu", 7)])
def test_cli_visualize_units_on_faces(capsys, tmp_path: Path, test_faces: Path, model: str, layer: str, field: int):
    out = tmp_path / "units.png"
    code = main(
        [
            "visualize-units",
            "--model",
            model,
            "--layer",
            layer,
            "--images",
            str(test_faces / "Barack_Obama"),
            "--out",
            str(out),
            "--units",
            "4",
            "--limit",
            "9",
            "--quiet",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and record["receptive_field_px"] == field and len(record["units"]) == 4
    assert all(u["top_image"].startswith(str(test_faces)) for u in record["units"])
    assert load_image(out).shape[0] > 100
    code = main(
        [
            "visualize-units",
            "--model",
            model,
            "--layer",
            "no_such_layer",
            "--images",
            str(test_faces),
            "--out",
            str(out),
        ]
    )
    assert code == EXIT_FATAL and "unknown" in capsys.readouterr().err


def test_training_content_resized_crops_are_squares():
    from models.style.train import augment

    rng = np.random.default_rng(0)
    photo = resize_long_side(skimage_data.rocket(), 200)
    for _ in range(20):
        crop = augment(photo, 48, rng)
        assert crop.shape == (48, 48, 3) and crop.dtype == np.uint8
