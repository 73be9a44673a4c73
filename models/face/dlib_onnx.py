"""Convert dlib's face-recognition ResNet (parsed by models.face.dlib_format) into an ONNX graph.

The graph takes `chip`, float32 [N, 3, rows, cols] RGB in 0..255, and returns `embedding`, float32 [N, 128],
matching dlib's `compute_face_descriptor` on the same aligned chip. Where dlib's semantics differ from the obvious
ONNX op, the graph emulates dlib exactly:

* input: dlib feeds (pixel - mean_rgb) / 256 (means from the file's input layer); done in-graph with Sub and Mul.
* add_prev: dlib's tt::add sizes its output to the maximum of each dimension of the two operands and reads missing
  elements as zero. In residual_down blocks the strided branch can be smaller (e.g. 3x3 vs the pooled 4x4) and
  narrower (32 vs 64 channels) than the skip branch, so each operand is zero-padded at the end of the channel,
  row and column axes before Add.
* avg_pool: dlib averages only the in-image part of a window (subm_clipped), i.e. count_include_pad=0; rows==0
  means the whole plane (GlobalAveragePool). max_pool likewise ignores padding (ONNX pads MaxPool with -inf).
* affine (inference batch norm, y = gamma*x + beta per channel) is folded into the preceding convolution.
* fc: dlib computes flatten(x) @ W with W stored [num_inputs, num_outputs], so it maps straight onto MatMul.

The output is byte-identical for identical input: fixed node and tensor names, no timestamps, no random ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from models.errors import ModelError, ModelFormatError
from models.face.dlib_format import (
    AddPrev,
    Affine,
    AvgPool,
    Con,
    DlibNetwork,
    Fc,
    Layer,
    MaxPool,
    Relu,
    Skip,
    Tag,
    parse_dlib_network,
)
from models.face.onnx_graph import BATCH_DIM, INPUT_NAME, OPSET, OUTPUT_NAME, GraphBuilder

log = logging.getLogger(__name__)

CONVERTER_VERSION: int = 1


@dataclass(frozen=True)
class _Value:
    """A tensor in the graph being built, with its static per-sample shape (channels, rows, cols) or (features,)."""

    name: str
    shape: tuple[int, ...]


def _conv_out(size: int, window: int, stride: int, pad: int) -> int:
    """dlib's output size for a window sliding over a padded axis (floor division, as in cpu_dlib.cpp)."""
    if size + 2 * pad < window:
        raise ModelFormatError(f"dlib model: a {window}-wide window does not fit an axis of {size} padded by {pad}")
    return 1 + (size + 2 * pad - window) // stride


def _fold_affine(con: Con, affine: Affine | None) -> tuple[np.ndarray, np.ndarray]:
    """The convolution's weights and biases with a following per-channel affine folded in (in float64)."""
    w = con.weights.astype(np.float64)
    b = con.biases.astype(np.float64)
    if affine is not None:
        g = affine.gamma.astype(np.float64)
        w = w * g[:, None, None, None]
        b = b * g + affine.beta.astype(np.float64)
    with np.errstate(over="ignore"):  # overflow shows up as inf, refused just below
        w32, b32 = w.astype(np.float32), b.astype(np.float32)
    if not (np.isfinite(w32).all() and np.isfinite(b32).all()):
        raise ModelFormatError("dlib model: a convolution's weights are not finite float32 values")
    return w32, b32


def _emit_conv(g: GraphBuilder, i: int, x: _Value, con: Con, affine: Affine | None) -> _Value:
    channels, rows, cols = x.shape
    if con.weights.shape[1] != channels:
        raise ModelFormatError(f"dlib model: layer {i} (con) expects {con.weights.shape[1]} channels, gets {channels}")
    w, b = _fold_affine(con, affine)
    out = g.node(
        "Conv",
        [x.name, g.const(f"l{i}_con_w", w), g.const(f"l{i}_con_b", b)],
        f"l{i}_con",
        kernel_shape=[con.rows, con.cols],
        strides=[con.stride_y, con.stride_x],
        pads=[con.padding_y, con.padding_x, con.padding_y, con.padding_x],
    )
    out_rows = _conv_out(rows, con.rows, con.stride_y, con.padding_y)
    out_cols = _conv_out(cols, con.cols, con.stride_x, con.padding_x)
    return _Value(out, (con.num_filters, out_rows, out_cols))


def _emit_affine(g: GraphBuilder, i: int, x: _Value, affine: Affine) -> _Value:
    """A free-standing affine (not after a con): y = gamma * x + beta, per channel or per element."""
    shape = (1, affine.gamma.shape[0], 1, 1) if affine.mode == "conv" else (1, *affine.gamma.shape)
    if affine.mode == "fc" and affine.gamma.shape != x.shape:
        raise ModelFormatError(f"dlib model: layer {i} (affine) has shape {affine.gamma.shape}, input {x.shape}")
    scaled = g.node("Mul", [x.name, g.const(f"l{i}_affine_g", affine.gamma.reshape(shape))], f"l{i}_affine_mul")
    out = g.node("Add", [scaled, g.const(f"l{i}_affine_b", affine.beta.reshape(shape))], f"l{i}_affine")
    return _Value(out, x.shape)


def _emit_pool(g: GraphBuilder, i: int, x: _Value, pool: AvgPool | MaxPool) -> _Value:
    channels, rows, cols = x.shape
    is_avg = isinstance(pool, AvgPool)
    if pool.rows == 0 and pool.cols == 0:
        # the whole-plane pool; dlib forbids padding here, so it is exactly the global pool
        op = "GlobalAveragePool" if is_avg else "GlobalMaxPool"
        return _Value(g.node(op, [x.name], f"l{i}_{op.lower()}"), (channels, 1, 1))
    win_r, win_c = pool.rows or rows, pool.cols or cols
    attrs: dict[str, object] = {
        "kernel_shape": [win_r, win_c],
        "strides": [pool.stride_y, pool.stride_x],
        "pads": [pool.padding_y, pool.padding_x, pool.padding_y, pool.padding_x],
    }
    if is_avg:
        attrs["count_include_pad"] = 0  # dlib averages only the clipped, in-image window
    op = "AveragePool" if is_avg else "MaxPool"
    out = g.node(op, [x.name], f"l{i}_{op.lower()}", **attrs)
    out_rows = _conv_out(rows, win_r, pool.stride_y, pool.padding_y)
    out_cols = _conv_out(cols, win_c, pool.stride_x, pool.padding_x)
    return _Value(out, (channels, out_rows, out_cols))


def _pad_to(g: GraphBuilder, name: str, x: _Value, shape: tuple[int, ...]) -> _Value:
    """Zero-pad x at the end of each non-batch axis up to shape (dlib's tt::add reads missing elements as 0)."""
    if x.shape == shape:
        return x
    extra = [target - have for have, target in zip(x.shape, shape, strict=True)]
    pads = np.array([0] * (1 + len(shape)) + [0, *extra], dtype=np.int64)
    out = g.node("Pad", [x.name, g.const(f"{name}_pads", pads)], name, mode="constant")
    return _Value(out, shape)


def _emit_add_prev(g: GraphBuilder, i: int, x: _Value, other: _Value) -> _Value:
    if len(x.shape) != len(other.shape):
        raise ModelFormatError(f"dlib model: layer {i} (add_prev) adds shapes {x.shape} and {other.shape}")
    shape = tuple(max(a, b) for a, b in zip(x.shape, other.shape, strict=True))
    if x.shape != other.shape:
        log.debug("add_prev at layer %d: %s + %s zero-padded to %s", i, x.shape, other.shape, shape)
    a = _pad_to(g, f"l{i}_add_prev_pad_a", x, shape)
    b = _pad_to(g, f"l{i}_add_prev_pad_b", other, shape)
    return _Value(g.node("Add", [a.name, b.name], f"l{i}_add_prev"), shape)


def _emit_fc(g: GraphBuilder, i: int, x: _Value, fc: Fc) -> _Value:
    features = int(np.prod(x.shape))
    if features != fc.num_inputs:
        raise ModelFormatError(f"dlib model: layer {i} (fc) expects {fc.num_inputs} inputs, gets {features}")
    # dlib's tensors are NCHW row-major, so flattening matches the (k, nr, nc) order dlib's gemm sees
    flat = g.node("Flatten", [x.name], f"l{i}_flatten", axis=1)
    out = g.node("MatMul", [flat, g.const(f"l{i}_fc_w", fc.weights)], f"l{i}_fc")
    if fc.biases is not None:
        out = g.node("Add", [out, g.const(f"l{i}_fc_b", fc.biases.reshape(1, -1))], f"l{i}_fc_bias")
    return _Value(out, (fc.num_outputs,))


def _nearest_tag(layers: tuple[Layer, ...], outputs: list[_Value], before: int, tag: int, what: str) -> _Value:
    """Like dlib's layer<tagN>(sub): the output of the nearest tag<tag> below layer `before`."""
    for j in range(before - 1, -1, -1):
        layer = layers[j]
        if isinstance(layer, Tag) and layer.id == tag:
            return outputs[j]
    raise ModelFormatError(f"dlib model: layer {before} ({what}) refers to tag{tag}, which is not below it")


def build_graph(net: DlibNetwork) -> GraphBuilder:
    g = GraphBuilder()
    means = np.array(net.input.mean_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
    centred = g.node("Sub", [INPUT_NAME, g.const("input_mean_rgb", means)], "input_centred")
    # dlib divides by 256.0; multiplying by 2**-8 is exact, so the result is bit-identical
    scale = np.array(1.0 / 256.0, dtype=np.float32)
    scaled = g.node("Mul", [centred, g.const("input_scale", scale)], "input_scaled")
    x = _Value(scaled, (3, net.input.rows, net.input.cols))

    layers = net.layers
    outputs: list[_Value] = []  # the output of each layer, indexed like `layers`
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, Con):
            follower = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(follower, Affine) and follower.mode == "conv":
                x = _emit_conv(g, i, x, layer, follower)
                outputs.extend((x, x))  # the affine's output is the fused conv's output
                i += 2
                continue
            x = _emit_conv(g, i, x, layer, None)
        elif isinstance(layer, Affine):
            x = _emit_affine(g, i, x, layer)
        elif isinstance(layer, Relu):
            x = _Value(g.node("Relu", [x.name], f"l{i}_relu"), x.shape)
        elif isinstance(layer, (AvgPool, MaxPool)):
            x = _emit_pool(g, i, x, layer)
        elif isinstance(layer, AddPrev):
            x = _emit_add_prev(g, i, x, _nearest_tag(layers, outputs, i, layer.tag, "add_prev"))
        elif isinstance(layer, Tag):
            pass  # a tag only names its input for later add_prev/skip layers
        elif isinstance(layer, Skip):
            x = _nearest_tag(layers, outputs, i, layer.tag, "skip")
        elif isinstance(layer, Fc):
            x = _emit_fc(g, i, x, layer)
        else:  # pragma: no cover - dlib_format only yields the kinds above
            raise ModelError(f"dlib model: layer {i} of kind {type(layer).__name__} has no ONNX conversion")
        outputs.append(x)
        i += 1

    if x.shape != (128,):
        raise ModelFormatError(f"dlib model: the network ends in shape {x.shape}, expected a 128-d embedding")
    g.node("Identity", [x.name], OUTPUT_NAME)
    return g


def convert_network(net: DlibNetwork) -> bytes:
    return build_graph(net).finish(
        graph_name="dlib_resnet_v1",
        inputs=[(INPUT_NAME, [BATCH_DIM, 3, net.input.rows, net.input.cols])],
        outputs=[(OUTPUT_NAME, [BATCH_DIM, 128])],
        opset=OPSET,
        producer="faceattend.dlib_onnx",
        version=CONVERTER_VERSION,
        what="dlib model",
    )


def convert_dlib_bytes(data: bytes) -> bytes:
    """dlib's serialised face-recognition network -> serialised ONNX ModelProto (deterministic bytes)."""
    net = parse_dlib_network(data)
    onnx_bytes = convert_network(net)
    log.info("converted dlib network (%d layers) to ONNX, %d bytes", len(net.layers), len(onnx_bytes))
    return onnx_bytes
