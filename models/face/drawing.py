"""Pictures for people: detections drawn on images, written as PNG."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from models.cache import atomic_write_bytes
from models.errors import ImageError
from models.types import Detection

# one colour per landmark (RGB): eyes red/yellow, nose magenta, mouth corners green/blue
_LANDMARK_COLOURS = ((230, 40, 40), (240, 220, 40), (220, 40, 220), (40, 200, 60), (40, 90, 240))


def draw_detections(image: np.ndarray, detections: list[Detection], labels: list[str] | None = None) -> np.ndarray:
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for i, det in enumerate(detections):
        x1, y1, x2, y2 = (round(v) for v in det.bbox)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 220, 0), thickness)
        text = labels[i] if labels else f"{det.score:.2f}"
        cv2.putText(out, text, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (0, 220, 0), thickness)
        for (x, y), colour in zip(det.landmarks, _LANDMARK_COLOURS, strict=True):
            cv2.circle(out, (round(x), round(y)), thickness + 1, colour, -1)
    return out


def write_png(path: Path, image_rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError(f"{path}: PNG encoding failed")
    atomic_write_bytes(Path(path), buf.tobytes())
