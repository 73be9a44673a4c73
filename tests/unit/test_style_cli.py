"""model-tool's style commands: bad inputs get a clear message and exit 2; the network path needs no weights."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.cli.model_tool import EXIT_FATAL, EXIT_OK, main
from models.imageio import load_image
from models.style.export import export_onnx
from models.style.runtime import StyleModelInfo
from models.style.transformer import TransformerConfig, TransformerNet


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[dict], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")], captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    out = {"photo": d / "photo.png", "corrupt": d / "corrupt.jpg", "text": d / "notes.png", "huge": d / "huge.png"}
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(out["photo"])
    out["corrupt"].write_bytes(out["photo"].read_bytes()[:400])  # a half-received upload
    out["text"].write_text("not an image\n")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    out["huge"].write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    torch.manual_seed(0)
    config = TransformerConfig(width=4, residual_blocks=1)
    out["model"] = d / "tiny.onnx"
    info = StyleModelInfo("procedural:swirl:0", "1" * 64, 5, config.to_json(), {})
    out["model"].write_bytes(export_onnx(TransformerNet(config).eval(), info))
    return out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("absent", "no such file"),
        ("corrupt", "corrupt or truncated"),
        ("text", "not a recognised image format"),
        ("huge", "too large"),
    ],
)
def test_stylize_refuses_bad_content_images(capsys, files, tmp_path: Path, content: str, message: str):
    path = files.get(content, tmp_path / "absent.jpg")
    code, _, err = _run(capsys, "stylize", "--content", str(path), "--style", "procedural:swirl", "--out", "x.png")
    assert code == EXIT_FATAL
    assert message in err and err.startswith("model-tool: ")


def test_stylize_needs_a_style_or_a_model_and_a_known_style(capsys, files, tmp_path: Path):
    code, _, err = _run(capsys, "stylize", "--content", str(files["photo"]), "--out", str(tmp_path / "g.png"))
    assert code == EXIT_FATAL and "--style" in err
    code, _, err = _run(
        capsys, "stylize", "--content", str(files["photo"]), "--style", "procedural:cubism", "--out", "g.png"
    )
    assert code == EXIT_FATAL and "unknown procedural style 'cubism'" in err
    code, _, err = _run(
        capsys, "stylize", "--content", str(files["photo"]), "--model", str(files["text"]), "--out", "g.png"
    )
    assert code == EXIT_FATAL and "not an ONNX model" in err
    for mode in ("--style", "--model"):  # a huge working size is refused before any work
        source = "procedural:swirl" if mode == "--style" else str(files["model"])
        code, _, err = _run(
            capsys, "stylize", "--content", str(files["photo"]), mode, source, "--out", "g.png", "--size", "100000"
        )
        assert code == EXIT_FATAL and "100000" in err
    with pytest.raises(SystemExit) as exc:  # argparse: a non-positive size is a usage error (exit 2)
        main(["stylize", "--content", "c.png", "--style", "s.png", "--out", "g.png", "--size", "0"])
    assert exc.value.code == EXIT_FATAL


def test_stylize_with_a_network_writes_the_result_and_the_grid(capsys, files, tmp_path: Path):
    out, grid = tmp_path / "result.png", tmp_path / "grid.png"
    code, (record,), _ = _run(
        capsys,
        "stylize",
        "--content",
        str(files["photo"]),
        "--model",
        str(files["model"]),
        "--style",
        "procedural:mosaic",
        "--size",
        "64",
        "--out",
        str(out),
        "--grid",
        str(grid),
    )
    assert code == EXIT_OK
    assert record["mode"] == "network" and record["style"] == "procedural:swirl:0"
    assert load_image(out).shape == (46, 64, 3)  # 50 x 70 scaled to a 64 px long side
    assert load_image(grid).shape[1] > 3 * 64


def test_export_style_refuses_what_is_not_a_checkpoint(capsys, files, tmp_path: Path):
    code, _, err = _run(capsys, "export-style", "--checkpoint", str(files["text"]), "--out", str(tmp_path / "m.onnx"))
    assert code == EXIT_FATAL and "not a readable style checkpoint" in err
    code, _, err = _run(capsys, "export-style", "--checkpoint", str(tmp_path / "none.ckpt"), "--out", "m.onnx")
    assert code == EXIT_FATAL and "no such checkpoint" in err


def test_bench_style_times_the_architecture_without_a_trained_model(capsys):
    code, (record,), _ = _run(capsys, "bench-style", "--size", "64", "--rounds", "2", "--width", "4")
    assert code == EXIT_OK
    assert record["threads"] == 1 and record["image"].endswith("64x64") and record["ms_median"] > 0
    assert record["transformer"] == {"width": 4, "residual_blocks": 5}
