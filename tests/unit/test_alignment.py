"""Similarity transform and chip extraction."""

import numpy as np
import pytest

from models.alignment import CHIP_SIZE, TEMPLATE, align_face, similarity_transform
from models.errors import ImageError


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


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


def test_chip_puts_landmarks_on_the_template():
    # an image whose landmarks are the template scaled by 3, rotated and shifted: marked with bright dots
    m = _similarity(3.0, 0.2, 100.0, 40.0)
    pts = TEMPLATE @ m[:, :2].T + m[:, 2]
    img = np.zeros((800, 800, 3), np.uint8)
    for x, y in pts:
        img[round(y) - 4 : round(y) + 5, round(x) - 4 : round(x) + 5] = 255
    chip = align_face(img, pts)
    assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3) and chip.dtype == np.uint8
    for x, y in TEMPLATE:
        assert chip[round(y), round(x)].max() > 100  # the dot lands where the template says


def test_large_faces_are_downsampled_through_a_pyramid_without_aliasing():
    # a fine checkerboard averages to grey when shrunk 8x properly; plain bilinear sampling would alias
    yy, xx = np.mgrid[0:1600, 0:1600]
    board = (((xx // 2 + yy // 2) % 2) * 255).astype(np.uint8)
    img = np.dstack([board] * 3)
    m = _similarity(8.0, 0.0, 200.0, 200.0)
    chip = align_face(img, TEMPLATE @ m[:, :2].T + m[:, 2])
    centre = chip[40:110, 40:110].astype(float)
    assert abs(centre.mean() - 127.5) < 10 and centre.std() < 20
