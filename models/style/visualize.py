"""What the networks learn (the seed's "what are deep ConvNets learning"): for the first units of a layer, the
image patches that activate each unit most, as one PNG grid.

Each patch is the unit's receptive field, cropped from the very image the network saw (resized, or the face
chip), with grey where the field reaches past the border; one patch per image and unit (its strongest position),
so nine patches are nine images. The receptive field is computed from the convolution and pooling geometry
(kernel, stride, padding, dilation) along the network's deepest path to the layer.

* `style`: the MobileNetV2 loss network; layers are module names (`features.0`, `features.7.conv.0`, ...).
* `face`: the dlib encoder's ONNX graph (models/registry.py converts it); layers are tensor names (`l2_relu`,
  ...). The tensor is added as an extra output to an in-memory copy of the graph and run with ONNX Runtime.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from models.errors import ImageError, StyleError
from models.imageio import list_images, load_image
from models.style.images import resize_long_side

log = logging.getLogger(__name__)

PATCH_PX = 56
FACE_CHIP = 150


@dataclass(frozen=True)
class ReceptiveField:
    """Unit (i, j) of a layer sees the input square of side `size` centred at (start + i*jump, start + j*jump)."""

    size: int = 1
    jump: int = 1
    start: float = 0.0

    def then(self, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> ReceptiveField:
        """The field after one more convolution / pooling layer with this geometry (pad = padding before)."""
        return ReceptiveField(
            size=self.size + (kernel - 1) * dilation * self.jump,
            jump=self.jump * stride,
            start=self.start + ((kernel - 1) * dilation / 2 - pad) * self.jump,
        )

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), end exclusive; may reach past the image."""
        half = (self.size - 1) / 2
        cy, cx = self.start + i * self.jump, self.start + j * self.jump
        return round(cy - half), round(cx - half), round(cy - half) + self.size, round(cx - half) + self.size


def crop(image: np.ndarray, box: tuple[int, int, int, int], fill: int = 128) -> np.ndarray:
    """The box from the image, grey where it lies outside."""
    y0, x0, y1, x1 = box
    h, w = image.shape[:2]
    out = np.full((y1 - y0, x1 - x0, 3), fill, np.uint8)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


# ---- the two networks -----------------------------------------------------------------------------------------


class _Probe(Protocol):
    """An image -> (the image as the network saw it, C x H x W activations of the layer)."""

    field: ReceptiveField
    ranked_before_clamp: bool

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def torch_field(model: Any, layer: str) -> ReceptiveField:
    """Receptive field of a module of a sequential-style torch network (modules registered in forward order)."""
    from torch import nn

    rf, inside = ReceptiveField(), False
    for name, module in model.named_modules():
        within = name == layer or name.startswith(layer + ".")
        if inside and not within:
            break
        inside = inside or within
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p, d = (module.kernel_size, module.stride, module.padding, getattr(module, "dilation", 1))
            k, s, p, d = (v[0] if isinstance(v, tuple) else v for v in (k, s, p, d))
            rf = rf.then(k, s, p, d)
    if not inside:
        raise StyleError(f"no layer {layer!r} in the network")
    return rf


class _StyleProbe:
    def __init__(self, layer: str, size: int) -> None:
        import torch

        from models.style.lossnet import ConvBNReLU, LossNetwork, load_mobilenet_v2, tap_names

        backbone = load_mobilenet_v2()
        if layer not in tap_names(backbone):
            examples = ", ".join(n for n in tap_names(backbone) if n.count(".") <= 3 and "conv.0" in n)
            raise StyleError(f"unknown style-network layer {layer!r}; e.g. features.0, {examples}")
        # ReLU6 saturates: many images tie at 6.0 in shallow layers. A conv-BN-ReLU6 unit is ranked by its value
        # before the clamp (the same unit, same order where it is below 6) so that ties are broken by strength.
        modules = dict(backbone.named_modules())
        self.ranked_before_clamp = isinstance(modules[layer], ConvBNReLU)
        self._layer = f"{layer}.1" if self.ranked_before_clamp else layer
        self._torch = torch
        self._net = LossNetwork(backbone, (self._layer,))
        self._size = size
        self.field = torch_field(backbone, layer)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from models.style.optimize import to_tensor

        seen = resize_long_side(image, self._size)
        with self._torch.no_grad():
            act = self._net(to_tensor(seen))[self._layer][0].numpy()
        return seen, act


def onnx_fields(model: Any) -> dict[str, ReceptiveField]:
    """Receptive field of every spatial tensor of an ONNX graph (single image input, nodes in topological order).

    Conv / MaxPool / AveragePool compose their geometry; Pad shifts the origin; any other node takes the largest
    field among its inputs (an Add of a residual and its shortcut sees what the residual path sees).
    """
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fields = {i.name: ReceptiveField() for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:
        known = [fields[i] for i in node.input if i in fields]
        if not known:
            continue
        if node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "Flatten", "Gemm", "MatMul", "Reshape"):
            continue  # no longer spatial
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rf = fields[node.input[0]] if node.input[0] in fields else max(known, key=lambda f: f.size)
        if node.op_type in ("Conv", "MaxPool", "AveragePool"):
            k = attrs.get("kernel_shape") or list(inits[node.input[1]].shape[2:])
            s, p, d = attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]), attrs.get("dilations", [1, 1])
            if k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or d[0] != d[1]:
                raise StyleError(f"{node.name}: non-square geometry is not supported by the receptive-field walk")
            rf = rf.then(int(k[0]), int(s[0]), int(p[0]), int(d[0]))
        elif node.op_type == "Pad" and len(node.input) > 1 and node.input[1] in inits:
            pads = inits[node.input[1]].tolist()
            rf = ReceptiveField(rf.size, rf.jump, rf.start - pads[2] * rf.jump)  # NCHW: pads[2] = H begin
        else:
            rf = max(known, key=lambda f: f.size)
        for out in node.output:
            fields[out] = rf
    return fields


class _FaceProbe:
    ranked_before_clamp = False

    def __init__(self, layer: str, threads: int) -> None:
        import onnx

        from models.backends import create_backend
        from models.face.encoders import encoder_onnx_path

        model = onnx.load(str(encoder_onnx_path()))
        fields = onnx_fields(model)
        relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
        if layer not in fields or layer in {i.name for i in model.graph.input}:
            raise StyleError(f"unknown face-network layer {layer!r}; the ReLU outputs are {', '.join(relus)}")
        self.field = fields[layer]
        model.graph.output.append(onnx.helper.make_tensor_value_info(layer, onnx.TensorProto.FLOAT, None))
        self._backend = create_backend("onnxruntime", model.SerializeToString(), label="face-units", threads=threads)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        chip = cv2.resize(image[y : y + side, x : x + side], (FACE_CHIP, FACE_CHIP), interpolation=cv2.INTER_AREA)
        batch = np.ascontiguousarray(chip.transpose(2, 0, 1)[None], dtype=np.float32)
        return chip, self._backend.run(batch)[-1][0]


# ---- the grid ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitPatches:
    unit: int
    activations: tuple[float, ...]  # strongest first
    sources: tuple[str, ...]  # image path of each patch
    patches: tuple[np.ndarray, ...]


def top_patches(
    probe: _Probe,
    images: Iterator[tuple[str, np.ndarray]],
    units: int,
    per_unit: int = 9,
    step: Callable[[], None] | None = None,
) -> list[UnitPatches]:
    """For units 0..units-1, the `per_unit` images whose strongest position activates the unit most."""
    seen: list[tuple[str, np.ndarray]] = []
    best: list[np.ndarray] = []  # per image: units x (value, i, j)
    for name, image in images:
        shown, act = probe(image)
        if act.ndim != 3:
            raise StyleError(f"the layer's output is not spatial (shape {act.shape})")
        n = min(units, act.shape[0])
        # only positions whose field is centred well inside the image: at the border, padding alone excites units
        rf, (h, w) = probe.field, shown.shape[:2]
        inner = act[:n].copy()
        for axis, extent in ((1, h), (2, w)):
            margin = min(max(1, rf.size // 4), extent // 4)
            centres = rf.start + rf.jump * np.arange(act.shape[axis])
            outside = (centres < margin) | (centres > extent - 1 - margin)
            if not outside.all():
                index = [slice(None)] * 3
                index[axis] = outside
                inner[tuple(index)] = -np.inf
        flat = inner.reshape(n, -1)
        arg = flat.argmax(axis=1)
        i, j = np.divmod(arg, act.shape[2])
        best.append(np.stack([flat[np.arange(n), arg], i, j], axis=1))
        seen.append((name, shown))
        if step:
            step()
    if not seen:
        raise ImageError("no readable images to visualise units on")
    table = np.stack(best)  # images x units x 3
    out = []
    for u in range(table.shape[1]):
        order = np.argsort(-table[:, u, 0], kind="stable")[:per_unit]
        patches = [crop(seen[k][1], probe.field.box(int(table[k, u, 1]), int(table[k, u, 2]))) for k in order]
        out.append(
            UnitPatches(
                u,
                tuple(float(table[k, u, 0]) for k in order),
                tuple(seen[k][0] for k in order),
                tuple(patches),
            )
        )
    return out


def render(units: Sequence[UnitPatches], title: str) -> np.ndarray:
    """Each unit a 3 x 3 block of patches (strongest top-left), blocks in rows of three, as in the lecture."""
    from PIL import Image, ImageDraw

    block = 3 * PATCH_PX + 2 * 2
    label_h, gap, head = 14, 10, 20
    cols = min(3, len(units))
    rows = -(-len(units) // cols)
    canvas = Image.new("RGB", (cols * (block + gap) + gap, head + rows * (block + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill=(0, 0, 0))
    for k, u in enumerate(units):
        bx = gap + (k % cols) * (block + gap)
        by = head + (k // cols) * (block + label_h + gap)
        draw.text((bx, by), f"unit {u.unit}  max {u.activations[0]:.2f}", fill=(0, 0, 0))
        for p, patch in enumerate(u.patches):
            interp = cv2.INTER_NEAREST if patch.shape[0] < PATCH_PX else cv2.INTER_AREA
            tile = cv2.resize(patch, (PATCH_PX, PATCH_PX), interpolation=interp)
            canvas.paste(
                Image.fromarray(tile), (bx + (p % 3) * (PATCH_PX + 2), by + label_h + (p // 3) * (PATCH_PX + 2))
            )
    return np.asarray(canvas)


def visualize_units(
    model: Literal["style", "face"],
    layer: str,
    images_dir: str | Path,
    *,
    units: int = 9,
    size: int = 224,
    limit: int | None = None,
    threads: int = 1,
    progress: bool = False,
) -> tuple[np.ndarray, list[UnitPatches], ReceptiveField]:
    """The PNG grid (RGB array), the patches behind it, and the layer's receptive field."""
    from tqdm import tqdm

    if units < 1 or not 32 <= size <= 2048:
        raise StyleError(f"units must be at least 1 and the size 32..2048 pixels, got {units} and {size}")
    if model == "style":
        import torch

        torch.set_num_threads(threads)
        probe: _Probe = _StyleProbe(layer, size)
    elif model == "face":
        probe = _FaceProbe(layer, threads)
    else:
        raise StyleError(f"unknown model {model!r}; use style or face")
    paths = list_images([images_dir])[:limit]
    if not paths:
        raise ImageError(f"{images_dir}: no images found")

    def readable() -> Iterator[tuple[str, np.ndarray]]:
        for p in paths:
            try:
                yield str(p), load_image(p)
            except ImageError as exc:
                log.warning("skipping %s", exc)

    with tqdm(total=len(paths), desc=f"units {layer}", unit="img", file=sys.stderr, disable=not progress) as bar:
        found = top_patches(probe, readable(), units, step=lambda: bar.update(1))
    rf = probe.field
    title = f"{model} network, layer {layer}: receptive field {rf.size} px, stride {rf.jump} px, {len(paths)} images"
    if probe.ranked_before_clamp:
        title += " (ranked before ReLU6)"
    return render(found, title), found, rf
