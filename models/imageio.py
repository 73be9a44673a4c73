"""Safe image loading: every input becomes an RGB uint8 array or raises ImageError with the reason.

Guards: empty and oversized files, decompression bombs (the pixel count is checked from the header before any
pixel is decoded), truncated or corrupt data, non-image files. Normalises EXIF orientation, grayscale,
palette, alpha, CMYK and 16-bit images.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.errors import ImageError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 50_000_000  # a 20000 x 20000 frame (400 MP, 1.2 GB as RGB) is refused up front
    max_side: int = 16_384


DEFAULT_LIMITS = ImageLimits()


def load_image(source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode a file path or encoded bytes into an HxWx3 RGB uint8 array."""
    label = "<bytes>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else _read_file(Path(source), limits)
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{label}: {len(data)} bytes exceeds the {limits.max_bytes}-byte limit")
    return decode_image(data, label, limits)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """An RGB uint8 image as JPEG bytes (snapshots, stylised paintings, face crops and thumbnails)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError(f"JPEG encoding of a {image.shape} image failed")
    return buf.tobytes()


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"{path}: {size} bytes exceeds the {limits.max_bytes}-byte limit")
        return path.read_bytes()
    except IsADirectoryError as exc:
        raise ImageError(f"{path}: is a directory, not an image") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied") from exc


def _refuse_truncated_images() -> None:
    """Some libraries (face_recognition, at import) switch PIL into padding truncated files with grey; a
    half-received camera upload must be refused instead, so the process-wide flag is put back, once, loudly."""
    from PIL import ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL was set to accept truncated images (by another library); turning that off")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, label: str, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    _refuse_truncated_images()
    try:
        with warnings.catch_warnings():
            # our own pixel limit applies; PIL's bomb warning would only duplicate it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(f"{label}: image has no pixels ({width}x{height})")
            if width * height > limits.max_pixels or max(width, height) > limits.max_side:
                raise ImageError(
                    f"{label}: too large: {width}x{height} pixels exceeds the limit "
                    f"({limits.max_pixels} pixels, {limits.max_side} per side)"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: too large, refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation and corruption this way
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc
    return _to_rgb8(img, label)


def _to_rgb8(img: PILImage, label: str) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit single channel: scale the value range to 8 bits instead of PIL's clipping conversion
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        gray = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # composite on white: transparent padding around a face should not read as a dark blob
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{label}: unsupported image mode {mode!r}")
    return np.ascontiguousarray(arr)


def list_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
