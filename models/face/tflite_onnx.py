"""Convert a float32 TFLite face-embedding network into an ONNX graph (our own converter).

The flatbuffer is read with the generated schema bindings of the `tflite` PyPI package (nothing else of TensorFlow;
`pip install 'faceattend[convert]'`); the graph is written by us. The graph takes `chip`, float32 [N, 3, S, S] RGB
in 0..255 (like the dlib encoder's), applies the network's input normalisation (x - mean) * scale itself, and
returns `embedding`, float32 [N, D], the network's raw output (normalising it is the encoder's job).

Supported: the operators of a TOCO-converted MobileFaceNet: CONV_2D, DEPTHWISE_CONV_2D, ADD, SUB, MUL (fused
activation none, RELU or RELU6), RELU, ABS, and a final RESHAPE of a 1 x 1 plane to [N, C]. Anything else, quantised
tensors, weights stored outside the flatbuffer, more than one subgraph: ModelFormatError naming it. How TFLite's
semantics map onto ONNX:

* layout: TFLite is NHWC, the ONNX graph NCHW. Convolution weights OHWI -> OIHW; depthwise weights [1, kh, kw, C*M]
  -> [C*M, 1, kh, kw] with group C (output channel c*M + m reads input channel c in both); a per-channel constant of
  an elementwise op (shape [C]) becomes (C, 1, 1);
* SAME padding: explicit pads from the static shapes, the odd pixel at the end as TensorFlow does;
* slim's PReLU, which TF1 writes as relu(x) + c * (x - |x|) (five ops), becomes Relu(x) + (2c) * Min(x, 0): the same
  numbers (x - |x| = 2 min(x, 0), and scaling by 2 is exact), one op fewer, and ONNX Runtime's CPU runs it faster
  than its own PRelu, which broadcasts a (C, 1, 1) slope slowly (MobileFaceNet, 2 threads: 8.4 against 12.6 ms a
  face); max(x, a x), two ops, would be exact only for slopes in [0, 1], and MobileFaceNet's run from -9.4 to 8.9;
* batch: a .tflite is fixed at one batch size; the ONNX batch dimension is symbolic (N), so the final RESHAPE becomes
  Flatten, the one shape-dependent op.

The output is byte-identical for identical input: node order is the flatbuffer's operator order, names are the
flatbuffer's tensor names, no timestamps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import ModelError, ModelFormatError
from models.face.onnx_graph import BATCH_DIM, INPUT_NAME, OPSET, OUTPUT_NAME, GraphBuilder

log = logging.getLogger(__name__)

CONVERTER_VERSION: int = 1


@dataclass(frozen=True)
class Prologue:
    """The input normalisation the network was trained with, put into the graph: (x - mean) * scale."""

    mean: float
    scale: float


@dataclass(frozen=True)
class _Op:
    index: int
    kind: str  # the builtin operator's name, e.g. CONV_2D
    raw: Any  # the flatbuffer Operator
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class _Value:
    """A tensor of the graph being built: its ONNX name and its NHWC shape as the flatbuffer declares it."""

    name: str
    shape: tuple[int, ...]


def _tflite() -> Any:
    try:
        import tflite
    except ImportError as exc:
        raise ModelError(
            "converting a TFLite model needs the `tflite` schema package: pip install 'faceattend[convert]'"
        ) from exc
    return tflite


class _Flatbuffer:
    """Typed access to the parts of a .tflite the converter reads."""

    def __init__(self, data: bytes) -> None:
        self.tfl = _tflite()
        try:
            self.model = self.tfl.Model.GetRootAsModel(data, 0)
            if self.model.SubgraphsLength() != 1:
                raise ModelFormatError(f"TFLite model: {self.model.SubgraphsLength()} subgraphs, expected 1")
            self.graph = self.model.Subgraphs(0)
            names = {v: k for k, v in vars(self.tfl.BuiltinOperator).items() if not k.startswith("_")}
            self.op_kinds = []
            for i in range(self.model.OperatorCodesLength()):
                code = self.model.OperatorCodes(i)
                number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
                self.op_kinds.append(names.get(number, f"builtin {number}"))
        except ModelFormatError:
            raise
        except Exception as exc:  # the generated bindings fail in many ways (struct.error, IndexError) on garbage
            raise ModelFormatError(f"TFLite model: not a readable flatbuffer ({type(exc).__name__}: {exc})") from exc

    def ops(self) -> Iterator[_Op]:
        for i in range(self.graph.OperatorsLength()):
            op = self.graph.Operators(i)
            yield _Op(
                i,
                self.op_kinds[op.OpcodeIndex()],
                op,
                tuple(int(op.Inputs(k)) for k in range(op.InputsLength())),
                tuple(int(op.Outputs(k)) for k in range(op.OutputsLength())),
            )

    def name(self, tensor: int) -> str:
        return self.graph.Tensors(tensor).Name().decode("utf-8", "replace")

    def shape(self, tensor: int) -> tuple[int, ...]:
        t = self.graph.Tensors(tensor)
        return tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def const(self, tensor: int) -> np.ndarray | None:
        """A constant tensor's value (float32 or int32), None for an activation."""
        t = self.graph.Tensors(tensor)
        buffer = self.model.Buffers(t.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            if buffer is not None and buffer.Offset() > 1:
                raise ModelFormatError(f"TFLite model: tensor {self.name(tensor)!r} is stored outside the flatbuffer")
            return None
        quant = t.Quantization()
        if quant is not None and quant.ScaleLength() > 0:
            raise ModelFormatError(f"TFLite model: tensor {self.name(tensor)!r} is quantised; only float32 converts")
        dtypes = {self.tfl.TensorType.FLOAT32: np.float32, self.tfl.TensorType.INT32: np.int32}
        if t.Type() not in dtypes:
            raise ModelFormatError(f"TFLite model: tensor {self.name(tensor)!r} has unsupported type {t.Type()}")
        raw = buffer.DataAsNumpy().tobytes()
        shape = self.shape(tensor)
        dtype = np.dtype(dtypes[t.Type()])
        if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ModelFormatError(f"TFLite model: tensor {self.name(tensor)!r} holds {len(raw)} bytes for {shape}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def options(self, op: _Op, cls_name: str) -> Any:
        table = op.raw.BuiltinOptions()
        if table is None:
            return None
        opts = getattr(self.tfl, cls_name)()
        opts.Init(table.Bytes, table.Pos)
        return opts


def _same_pads(in_hw: tuple[int, int], k_hw: tuple[int, int], strides: tuple[int, int]) -> list[int]:
    """TensorFlow's SAME padding as ONNX pads [top, left, bottom, right]: the odd pixel goes at the end."""
    begin, end = [], []
    for size, k, s in zip(in_hw, k_hw, strides, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return [begin[0], begin[1], end[0], end[1]]


def _prelu_sites(fb: _Flatbuffer, ops: list[_Op]) -> tuple[dict[int, tuple[int, np.ndarray]], set[int]]:
    """Where slim's PReLU appears: {ADD op index: (x tensor, slope)}, and the indices of the ops it replaces.

    The pattern, every intermediate used by the pattern alone: r = RELU(x); a = ABS(x); s = SUB(x, a);
    m = MUL(c, s) (either order, c a constant); ADD(r, m) (either order, no fused activation)."""
    producer = {t: op for op in ops for t in op.outputs}
    users: dict[int, int] = {}
    for op in ops:
        for t in op.inputs:
            users[t] = users.get(t, 0) + 1
    sites: dict[int, tuple[int, np.ndarray]] = {}
    replaced: set[int] = set()
    for add in ops:
        if add.kind != "ADD" or len(add.inputs) != 2:
            continue
        opts = fb.options(add, "AddOptions")
        if opts is not None and opts.FusedActivationFunction() != 0:
            continue
        by_kind = {p.kind: p for p in (producer.get(t) for t in add.inputs) if p is not None}
        relu, mul = by_kind.get("RELU"), by_kind.get("MUL")
        if relu is None or mul is None:
            continue
        x = relu.inputs[0]
        constants = [(t, fb.const(t)) for t in mul.inputs]
        slopes = [c for _, c in constants if c is not None]
        moving = [t for t, c in constants if c is None]
        sub = producer.get(moving[0]) if len(slopes) == 1 and len(moving) == 1 else None
        if sub is None or sub.kind != "SUB" or sub.inputs[0] != x:
            continue
        absolute = producer.get(sub.inputs[1])
        if absolute is None or absolute.kind != "ABS" or absolute.inputs[0] != x:
            continue
        inner = (relu, absolute, sub, mul)
        if any(users.get(op.outputs[0], 0) != 1 for op in inner):
            continue  # an intermediate feeds something else: keep the ops as they are
        mul_opts = fb.options(mul, "MulOptions")
        if mul_opts is not None and mul_opts.FusedActivationFunction() != 0:
            continue
        sites[add.index] = (x, (2.0 * slopes[0].astype(np.float64)).astype(np.float32))
        replaced.update(op.index for op in inner)
    return sites, replaced


class _Converter:
    def __init__(self, fb: _Flatbuffer, prologue: Prologue) -> None:
        self.fb = fb
        self.g = GraphBuilder()
        self.values: dict[int, _Value] = {}
        self.consts: dict[str, np.ndarray] = {}
        inputs = [int(fb.graph.Inputs(i)) for i in range(fb.graph.InputsLength())]
        outputs = [int(fb.graph.Outputs(i)) for i in range(fb.graph.OutputsLength())]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelFormatError(f"TFLite model: {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 1")
        self.input, self.output = inputs[0], outputs[0]
        shape = fb.shape(self.input)
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise ModelFormatError(f"TFLite model: input shape {shape}, expected [N, S, S, 3]")
        self.size = shape[1]
        centred = self.g.node(
            "Sub", [INPUT_NAME, self._const("input_mean", np.float32(prologue.mean))], "input_centred"
        )
        scaled = self.g.node("Mul", [centred, self._const("input_scale", np.float32(prologue.scale))], "input_scaled")
        self.values[self.input] = _Value(scaled, shape)

    def _const(self, name: str, value: np.ndarray | np.floating) -> str:
        """An initializer; a name the flatbuffer uses twice for different values gets a suffix."""
        array = np.asarray(value)
        key, n = name, 1
        while key in self.consts and not np.array_equal(self.consts[key], array):
            n += 1
            key = f"{name}__{n}"
        if key not in self.consts:
            self.consts[key] = array
            self.g.const(key, array)
        return key

    def value(self, tensor: int, at: _Op) -> _Value:
        if tensor not in self.values:
            raise ModelFormatError(
                f"TFLite model: op {at.index} ({at.kind}) reads {self.fb.name(tensor)!r} before it exists"
            )
        return self.values[tensor]

    def activation(self, out: str, code: int, at: _Op) -> str:
        if code == 0:
            return out
        if code == 1:
            return self.g.node("Relu", [out], f"{out}/relu")
        if code == 3:
            low, high = self._const("relu6_low", np.float32(0.0)), self._const("relu6_high", np.float32(6.0))
            return self.g.node("Clip", [out, low, high], f"{out}/relu6")
        raise ModelFormatError(f"TFLite model: op {at.index} ({at.kind}) has fused activation {code}, not supported")

    def convert(self) -> bytes:
        ops = list(self.fb.ops())
        prelus, replaced = _prelu_sites(self.fb, ops)
        for op in ops:
            if op.index in replaced:
                continue
            if op.index in prelus:
                self.prelu(op, *prelus[op.index])
            elif op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                self.conv(op)
            elif op.kind in ("ADD", "SUB", "MUL"):
                self.elementwise(op)
            elif op.kind in ("RELU", "ABS"):
                x = self.value(op.inputs[0], op)
                self.emit(op, self.g.node(op.kind.capitalize(), [x.name], self.fb.name(op.outputs[0])))
            elif op.kind == "RESHAPE":
                self.reshape(op)
            else:
                raise ModelFormatError(
                    f"TFLite model: op {op.index} is {op.kind}, which this converter does not handle"
                )
        out = self.values.get(self.output)
        if out is None or len(out.shape) != 2:
            shape = None if out is None else out.shape
            raise ModelFormatError(f"TFLite model: the graph's output is {shape}, expected an [N, D] tensor")
        dim = out.shape[1]
        self.g.node("Identity", [out.name], OUTPUT_NAME)
        log.info("converted TFLite graph: %d ops, %d PReLUs rewritten, %d-d output", len(ops), len(prelus), dim)
        return self.g.finish(
            graph_name="tflite_face_encoder",
            inputs=[(INPUT_NAME, [BATCH_DIM, 3, self.size, self.size])],
            outputs=[(OUTPUT_NAME, [BATCH_DIM, dim])],
            opset=OPSET,
            producer="faceattend.tflite_onnx",
            version=CONVERTER_VERSION,
            what="TFLite model",
        )

    def emit(self, op: _Op, name: str) -> None:
        self.values[op.outputs[0]] = _Value(name, self.fb.shape(op.outputs[0]))

    def prelu(self, op: _Op, x_tensor: int, slope: np.ndarray) -> None:
        x = self.value(x_tensor, op)
        base = self.fb.name(op.outputs[0])
        if len(x.shape) == 4:
            slope = slope.reshape(-1, 1, 1)
        positive = self.g.node("Relu", [x.name], f"{base}/positive")
        negative = self.g.node("Min", [x.name, self._const("zero", np.float32(0.0))], f"{base}/negative")
        scaled = self.g.node("Mul", [negative, self._const(f"{base}/slope", slope)], f"{base}/negative_scaled")
        self.emit(op, self.g.node("Add", [positive, scaled], base))

    def conv(self, op: _Op) -> None:
        depthwise = op.kind == "DEPTHWISE_CONV_2D"
        opts = self.fb.options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
        if opts is None:
            raise ModelFormatError(f"TFLite model: op {op.index} ({op.kind}) has no options")
        x = self.value(op.inputs[0], op)
        weights = self.fb.const(op.inputs[1])
        if weights is None or weights.ndim != 4 or len(x.shape) != 4:
            raise ModelFormatError(f"TFLite model: op {op.index} ({op.kind}) needs constant 4-D weights on a 4-D input")
        if (opts.DilationHFactor(), opts.DilationWFactor()) != (1, 1):
            raise ModelFormatError(f"TFLite model: op {op.index} ({op.kind}) is dilated, not supported")
        channels = x.shape[3]
        if depthwise:
            _, kh, kw, out_channels = weights.shape
            kernel = weights.reshape(kh, kw, out_channels).transpose(2, 0, 1)[:, None]  # [C*M, 1, kh, kw]
            group = channels
            if out_channels % channels:
                raise ModelFormatError(f"TFLite model: op {op.index}: {out_channels} outputs for {channels} channels")
        else:
            out_channels, kh, kw, in_channels = weights.shape
            if in_channels != channels:
                raise ModelFormatError(f"TFLite model: op {op.index} expects {in_channels} channels, gets {channels}")
            kernel = weights.transpose(0, 3, 1, 2)  # OHWI -> OIHW
            group = 1
        strides = (opts.StrideH(), opts.StrideW())
        same = opts.Padding() == self.fb.tfl.Padding.SAME
        pads = _same_pads((x.shape[1], x.shape[2]), (kh, kw), strides) if same else [0, 0, 0, 0]
        base = self.fb.name(op.outputs[0])
        inputs = [x.name, self._const(self.fb.name(op.inputs[1]), kernel.astype(np.float32))]
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bias = self.fb.const(op.inputs[2])
            if bias is None or bias.shape != (out_channels,):
                raise ModelFormatError(
                    f"TFLite model: op {op.index} ({op.kind}) has a bias that is not [{out_channels}]"
                )
            inputs.append(self._const(self.fb.name(op.inputs[2]), bias.astype(np.float32)))
        fused = opts.FusedActivationFunction()
        conv = self.g.node(
            "Conv",
            inputs,
            base if fused == 0 else f"{base}/conv",
            kernel_shape=[kh, kw],
            strides=list(strides),
            pads=pads,
            group=group,
        )
        expected = self.fb.shape(op.outputs[0])
        rows = (x.shape[1] + pads[0] + pads[2] - kh) // strides[0] + 1
        cols = (x.shape[2] + pads[1] + pads[3] - kw) // strides[1] + 1
        if expected[1:] != (rows, cols, out_channels):
            raise ModelFormatError(
                f"TFLite model: op {op.index} ({op.kind}) gives {rows}x{cols}x{out_channels}, "
                f"the flatbuffer declares {expected}"
            )
        self.emit(op, self.activation(conv, fused, op))

    def operand(self, tensor: int, rank: int, at: _Op) -> str:
        value = self.fb.const(tensor)
        if value is None:
            return self.value(tensor, at).name
        value = value.astype(np.float32)
        if value.size == 1:
            value = value.reshape(())
        elif value.ndim == 1 and rank == 4:
            value = value.reshape(-1, 1, 1)  # per-channel along NHWC's last axis = NCHW's channel axis
        elif value.ndim != 1:
            raise ModelFormatError(f"TFLite model: op {at.index} ({at.kind}) has a {value.shape} constant operand")
        return self._const(self.fb.name(tensor), value)

    def elementwise(self, op: _Op) -> None:
        if len(op.inputs) != 2:
            raise ModelFormatError(f"TFLite model: op {op.index} ({op.kind}) has {len(op.inputs)} inputs")
        rank = len(self.fb.shape(op.outputs[0]))
        a, b = (self.operand(t, rank, op) for t in op.inputs)
        opts = self.fb.options(op, f"{op.kind.capitalize()}Options")
        fused = opts.FusedActivationFunction() if opts is not None else 0
        base = self.fb.name(op.outputs[0])
        out = self.g.node(op.kind.capitalize(), [a, b], base if fused == 0 else f"{base}/op")
        self.emit(op, self.activation(out, fused, op))

    def reshape(self, op: _Op) -> None:
        x = self.value(op.inputs[0], op)
        target = self.fb.shape(op.outputs[0])
        if not (len(x.shape) == 4 and x.shape[1:3] == (1, 1) and len(target) == 2 and target[1] == x.shape[3]):
            raise ModelFormatError(
                f"TFLite model: op {op.index} reshapes {x.shape} to {target}; only [N, 1, 1, C] to [N, C] converts"
            )
        self.emit(op, self.g.node("Flatten", [x.name], self.fb.name(op.outputs[0]), axis=1))


def convert_tflite_bytes(data: bytes, prologue: Prologue) -> bytes:
    """A float32 .tflite -> serialised ONNX ModelProto (deterministic bytes), `prologue` applied to the input."""
    return _Converter(_Flatbuffer(data), prologue).convert()
