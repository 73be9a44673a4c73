"""Style images made without files (numpy and OpenCV only), so the demo and the product need no painting.

* `swirl`: domain-warped sinusoidal bands through a night-sky palette, with short oriented brush strokes.
* `mosaic`: stained-glass Voronoi cells in saturated colours, separated by dark lead lines.

The same name, size and seed always give the same pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.errors import StyleError

STYLES = ("swirl", "mosaic")

_SWIRL_PALETTE = np.array(
    [(12, 24, 70), (25, 60, 140), (70, 120, 190), (150, 190, 210), (235, 215, 110), (245, 180, 40)], np.float32
)
_MOSAIC_PALETTE = np.array(
    [(200, 30, 40), (240, 160, 20), (250, 220, 60), (40, 140, 60), (30, 90, 180), (110, 40, 150), (230, 230, 210)],
    np.float32,
)


def parse_spec(spec: str) -> tuple[str, int]:
    """`NAME` or `NAME:SEED` -> (name, seed)."""
    name, _, seed = spec.partition(":")
    if name not in STYLES:
        raise StyleError(f"unknown procedural style {name!r}; available: {', '.join(STYLES)}")
    try:
        return name, int(seed) if seed else 0
    except ValueError as exc:
        raise StyleError(f"procedural style seed must be an integer, got {seed!r}") from exc


def make_style(name: str, size: int = 512, *, seed: int = 0) -> np.ndarray:
    """A size x size RGB uint8 texture."""
    if size < 16 or size > 4096:
        raise StyleError(f"procedural style size must be 16..4096, got {size}")
    rng = np.random.default_rng(seed)
    if name == "swirl":
        return _swirl(size, rng)
    if name == "mosaic":
        return _mosaic(size, rng)
    raise StyleError(f"unknown procedural style {name!r}; available: {', '.join(STYLES)}")


def _noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise in [-1, 1]: a random cells x cells grid, upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), -1, 1)


def _palette(t: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map t in [0, 1] through a piecewise-linear palette -> H x W x 3 float."""
    pos = np.clip(t, 0, 1) * (len(palette) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(palette) - 2)
    frac = (pos - lo)[..., None]
    return palette[lo] * (1 - frac) + palette[lo + 1] * frac


def _swirl(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    warp_x, warp_y = _noise(size, 5, rng), _noise(size, 5, rng)
    u, v = xx + 0.25 * warp_x, yy + 0.25 * warp_y
    field = np.sin(2 * np.pi * (3 * u + 1.5 * np.sin(2 * np.pi * v))) + 0.6 * np.sin(2 * np.pi * 7 * (u - v))
    field += 0.5 * _noise(size, 12, rng)
    img = _palette((field + 2.1) / 4.2, _SWIRL_PALETTE)
    # short brush strokes along the flow: anisotropic blur of high-frequency noise, then modulated in
    strokes = rng.uniform(-1, 1, (size, size)).astype(np.float32)
    length = max(3, size // 40) | 1
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    strokes = cv2.filter2D(strokes, -1, kernel) * 3
    img *= (1 + 0.25 * np.clip(strokes, -1, 1))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _mosaic(size: int, rng: np.random.Generator) -> np.ndarray:
    n = 60 + size // 8
    seeds = rng.uniform(0, size, (n, 2)).astype(np.float32)
    colours = _MOSAIC_PALETTE[rng.integers(0, len(_MOSAIC_PALETTE), n)]
    colours = colours * rng.uniform(0.75, 1.1, (n, 1)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    best = np.full((size, size), np.inf, np.float32)
    second = np.full((size, size), np.inf, np.float32)
    label = np.zeros((size, size), np.int64)
    for i, (sx, sy) in enumerate(seeds):  # nearest and second-nearest seed, one seed at a time (bounded memory)
        d = np.hypot(xx - sx, yy - sy)
        closer = d < best
        second = np.where(closer, best, np.minimum(second, d))
        label = np.where(closer, i, label)
        best = np.where(closer, d, best)
    img = colours[label]
    lead = (second - best) < max(1.5, size / 170)  # near the border between two cells
    img[lead] = (25, 20, 20)
    img *= (1 + 0.08 * _noise(size, 40, rng))[..., None]  # glass texture
    return np.clip(img, 0, 255).astype(np.uint8)
