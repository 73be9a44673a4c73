"""Similarity transform, chip extraction and the two alignment methods."""

import numpy as np
import pytest

from models.errors import ConfigError, ImageError
from models.face.alignment import CHIP_SIZE, TEMPLATE, Aligner, similarity_transform, warp_chip
from models.types import Detection


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _detection(points: np.ndarray) -> Detection:
    x1, y1 = points.min(axis=0) - 40
    x2, y2 = points.max(axis=0) + 40
    return Detection((float(x1), float(y1), float(x2), float(y2)), 0.99, tuple(map(tuple, points.tolist())))


def test_recovers_a_known_similarity_exactly():
    m = _similarity(1.7, 0.3, 12.0, -5.0)
    dst = TEMPLATE @ m[:, :2].T + m[:, 2]
    assert np.allclose(similarity_transform(TEMPLATE, dst), m, atol=1e-9)


def test_never_reflects():
    mirrored = TEMPLATE * [-1, 1]
    m = similarity_transform(TEMPLATE, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_degenerate_landmarks_raise():
    with pytest.raises(ImageError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), TEMPLATE)


def test_template_chip_puts_landmarks_on_the_template():
    # an image whose landmarks are the template scaled by 3, rotated and shifted: marked with bright dots
    m = _similarity(3.0, 0.2, 100.0, 40.0)
    pts = TEMPLATE @ m[:, :2].T + m[:, 2]
    img = np.zeros((800, 800, 3), np.uint8)
    for x, y in pts:
        img[round(y) - 4 : round(y) + 5, round(x) - 4 : round(x) + 5] = 255
    (chip,) = Aligner("template").align(img, [_detection(pts)])
    assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3) and chip.dtype == np.uint8
    for x, y in TEMPLATE:
        assert chip[round(y), round(x)].max() > 100  # the dot lands where the template says


def test_large_faces_are_downsampled_through_a_pyramid_without_aliasing():
    # a fine checkerboard averages to grey when shrunk 8x properly; plain bilinear sampling would alias
    yy, xx = np.mgrid[0:1600, 0:1600]
    board = (((xx // 2 + yy // 2) % 2) * 255).astype(np.uint8)
    img = np.dstack([board] * 3)
    m = np.linalg.inv(np.vstack([_similarity(8.0, 0.0, 200.0, 200.0), [0, 0, 1]]))[:2]
    centre = warp_chip(img, m)[40:110, 40:110].astype(float)
    assert abs(centre.mean() - 127.5) < 10 and centre.std() < 20


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="alignment method"):
        Aligner("eyeball")


def test_no_faces_gives_an_empty_stack():
    chips = Aligner().align(np.zeros((50, 50, 3), np.uint8), [])
    assert chips.shape == (0, CHIP_SIZE, CHIP_SIZE, 3)
