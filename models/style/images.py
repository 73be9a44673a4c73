"""Image plumbing shared by the style tools (numpy, OpenCV and PIL only: the edge can import it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from models.errors import ImageError
from models.imageio import load_image

PROCEDURAL_PREFIX = "procedural:"


def resize_long_side(image: np.ndarray, size: int) -> np.ndarray:
    """Scale an H x W x 3 image so that its longer side is `size` pixels (area filter when shrinking)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale == 1:
        return image
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, shape, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def load_style(spec: str, size: int = 512) -> tuple[np.ndarray, str]:
    """A style image (RGB uint8) and its label: a file path, or `procedural:NAME[:SEED]` made without files."""
    if spec.startswith(PROCEDURAL_PREFIX):
        from models.style.procedural import make_style, parse_spec

        name, seed = parse_spec(spec[len(PROCEDURAL_PREFIX) :])
        return make_style(name, size, seed=seed), f"{PROCEDURAL_PREFIX}{name}:{seed}"
    return load_image(spec), Path(spec).name


def grid(cells: Sequence[tuple[str, np.ndarray]], *, height: int = 256, columns: int | None = None) -> np.ndarray:
    """Images side by side (rows of `columns`), each scaled to `height` pixels, a caption above each."""
    from PIL import Image, ImageDraw

    if not cells:
        raise ImageError("nothing to put in a grid")
    columns = columns or len(cells)
    caption = 18
    scaled = []
    for title, img in cells:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ImageError(f"grid cell {title!r}: expected H x W x 3 uint8, got {img.shape} {img.dtype}")
        w = max(1, round(img.shape[1] * height / img.shape[0]))
        interp = cv2.INTER_NEAREST if img.shape[0] < height // 4 else cv2.INTER_AREA
        scaled.append((title, cv2.resize(img, (w, height), interpolation=interp)))
    rows = [scaled[i : i + columns] for i in range(0, len(scaled), columns)]
    width = max(sum(im.shape[1] for _, im in row) + 4 * (len(row) + 1) for row in rows)
    canvas = Image.new("RGB", (width, len(rows) * (height + caption + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 4
    for row in rows:
        x = 4
        for title, im in row:
            draw.text((x, y + 2), title[: max(4, im.shape[1] // 7)], fill=(0, 0, 0))
            canvas.paste(Image.fromarray(im), (x, y + caption))
            x += im.shape[1] + 4
        y += height + caption + 4
    return np.asarray(canvas)
