"""Feed-forward stylisation with the exported ONNX network through models/backends (numpy only, no torch).

    with Stylizer.from_onnx("starry.onnx", backend="onnxruntime", threads=1) as s:
        painted = s.stylize(snapshot_bgr)  # H x W x 3 uint8 BGR in, same shape out

Images are padded (reflection) to multiples of 4 and cropped back; images whose long side exceeds `max_side`
are stylised at `max_side` and scaled back to their size. TensorRT engines keep InstanceNormalization in FP32
(FP16 instance norm overflows its variance and breaks the picture).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.backends import create_backend
from models.backends.base import InferenceBackend, ShapeProfile
from models.errors import ImageError, StyleError

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "stylized"
METADATA_KEY = "faceattend.style"
SIZE_MULTIPLE = 4
MIN_SIDE = 16
MAX_SIDE = 4096
FP32_LAYERS = ("InstanceNormalization",)


@dataclass(frozen=True)
class StyleModelInfo:
    """What an exported style network is: its style, how long it trained, the held-out verdict (if measured)."""

    style_label: str
    style_sha256: str
    iterations: int
    transformer: dict[str, Any]
    weights: dict[str, Any]
    heldout: dict[str, Any] | None = None

    @property
    def undertrained(self) -> bool | None:
        return None if self.heldout is None else bool(self.heldout.get("undertrained"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_onnx(cls, path: str | Path) -> StyleModelInfo:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except FileNotFoundError as exc:
            raise StyleError(f"{path}: no such style model") from exc
        except Exception as exc:  # DecodeError and friends
            raise StyleError(f"{path}: not an ONNX model ({exc})") from exc
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise StyleError(f"{path}: not a faceattend style model (no {METADATA_KEY} metadata)")
        try:
            data = json.loads(props[METADATA_KEY])
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise StyleError(f"{path}: malformed {METADATA_KEY} metadata ({exc})") from exc


def style_profile(max_side: int) -> ShapeProfile:
    """TensorRT shapes: one image, any size from MIN_SIDE to max_side (rounded up to the multiple)."""
    top = -(-max_side // SIZE_MULTIPLE) * SIZE_MULTIPLE
    opt = min(512, top)
    return ShapeProfile((1, 3, MIN_SIDE, MIN_SIDE), (1, 3, opt, opt), (1, 3, top, top))


class Stylizer:
    def __init__(self, backend: InferenceBackend, info: StyleModelInfo, *, max_side: int = 1024) -> None:
        self._backend = backend
        self.info = info
        self.max_side = max_side

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        backend: str = "onnxruntime",
        *,
        threads: int | None = 1,
        max_side: int = 1024,
        precision: str = "fp16",
    ) -> Stylizer:
        if not MIN_SIDE <= max_side <= MAX_SIDE:
            raise StyleError(f"the working size must be {MIN_SIDE}..{MAX_SIDE} pixels, got {max_side}")
        info = StyleModelInfo.from_onnx(path)
        if info.undertrained and info.heldout is not None:
            log.warning(
                "%s: marked undertrained by its held-out check (J %.2fx, style loss %.2fx the optimiser mode's)",
                path,
                info.heldout.get("cost_ratio", float("nan")),
                info.heldout.get("style_ratio", float("nan")),
            )
        engine = create_backend(
            backend,
            Path(path),
            label=f"style-{Path(path).stem}",
            profile=style_profile(max_side),
            precision=precision,
            threads=threads,
            fp32_layers=FP32_LAYERS,
        )
        return cls(engine, info, max_side=max_side)

    def stylize(self, image_bgr: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 BGR -> the stylised image, same shape and type."""
        return self.stylize_rgb(_check(image_bgr)[:, :, ::-1])[:, :, ::-1].copy()

    def stylize_rgb(self, image_rgb: np.ndarray) -> np.ndarray:
        image = _check(image_rgb)
        h, w = image.shape[:2]
        work = image
        if max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            work = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        wh, ww = work.shape[:2]
        ph, pw = -wh % SIZE_MULTIPLE, -ww % SIZE_MULTIPLE
        if ph or pw:
            work = cv2.copyMakeBorder(work, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
        batch = np.ascontiguousarray(work.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        out = self._backend.run(batch)[0][0, :, :wh, :ww]
        result = (np.clip(out, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
        if (wh, ww) != (h, w):
            result = cv2.resize(result, (w, h), interpolation=cv2.INTER_CUBIC)
        return np.ascontiguousarray(result)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Stylizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a numpy image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected an H x W x 3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ImageError(f"image {image.shape[1]}x{image.shape[0]} is too small to stylise (min {MIN_SIDE} px)")
    return image
