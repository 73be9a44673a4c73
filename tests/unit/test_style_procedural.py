"""Styles made without files, and the style argument that accepts them next to any image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.errors import ImageError, StyleError
from models.style.images import grid, load_style, resize_long_side
from models.style.procedural import STYLES, make_style, parse_spec


@pytest.mark.parametrize("name", STYLES)
def test_procedural_styles_are_deterministic_colourful_textures(name: str):
    a = make_style(name, 96, seed=1)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, make_style(name, 96, seed=1))
    assert not np.array_equal(a, make_style(name, 96, seed=2))
    assert a.std() > 30  # a texture, not a flat colour
    assert np.ptp(a.reshape(-1, 3).mean(0)) > 10 or a.reshape(-1, 3).std(0).min() > 20  # coloured, not grey


def test_style_spec_parsing_and_errors(tmp_path: Path):
    assert parse_spec("mosaic") == ("mosaic", 0)
    assert parse_spec("swirl:7") == ("swirl", 7)
    with pytest.raises(StyleError, match="unknown procedural style"):
        parse_spec("cubism")
    with pytest.raises(StyleError, match="integer"):
        parse_spec("swirl:x")
    with pytest.raises(StyleError, match="size"):
        make_style("swirl", 8)
    image, label = load_style("procedural:swirl:3", size=64)
    assert image.shape == (64, 64, 3) and label == "procedural:swirl:3"
    with pytest.raises(ImageError, match="no such file"):
        load_style(str(tmp_path / "absent.jpg"))


def test_resize_and_grid():
    img = np.zeros((30, 60, 3), np.uint8)
    assert resize_long_side(img, 120).shape == (60, 120, 3)
    assert resize_long_side(img, 60) is img
    g = grid([("a", img), ("b", np.full((10, 10, 3), 255, np.uint8))], height=40)
    assert g.ndim == 3 and g.shape[0] > 40 and g.shape[1] >= 80 + 40
    with pytest.raises(ImageError):
        grid([])
    with pytest.raises(ImageError, match="uint8"):
        grid([("x", img.astype(np.float32))])
