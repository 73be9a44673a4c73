"""A pure-Python reader of dlib's serialised DNN files (no dlib import), as written by `dlib::serialize(net, out)`.

Only what dlib's face-recognition ResNet needs is understood: the metric loss, the sized RGB input layer, con_,
affine_, relu_, add_prev_, max_pool_, avg_pool_, fc_ and the tag/skip pass-through layers. Anything else, and any
truncated or malformed byte, raises ModelFormatError naming the byte offset and what was expected there.

How dlib lays the file out (dlib/serialize.h, dlib/dnn/{core,layers,loss,input}.h, dlib/dnn/tensor.h):

* integers: a control byte (low 4 bits = byte count, 0x80 = negative) then that many little-endian bytes of the
  absolute value; strings: such an integer length, then the bytes; bools: the ASCII byte '1' or '0'; floats and
  doubles: two integers, mantissa (int64) then exponent (int16), value = mantissa * 2**exponent, with exponents
  32000/32001/32002 meaning +inf/-inf/nan (dlib/float_details.h);
* tensors (version 2): num_samples, k, nr, nc, then raw little-endian float32; alias tensors (version 1): the four
  dimensions only;
* `add_layer` writes its version, then its whole subnetwork, then its own details; tag and skip layers write only
  a version and their subnetwork. So a file is: the loss, then one version integer per layer from the output down
  to the input, then the input layer, then each layer's details from the input upward. Tag and skip layers leave
  nothing but their version (1) in the first run, so they are told from add_layers (version 2) by that alone, and
  their ids are not in the file at all (see `_resolve_markers`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.errors import ModelFormatError

log = logging.getLogger(__name__)

# dlib's float_details marks non-finite values with these exponents
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002
# a layer's version string is a short identifier; anything longer or odder means we are not looking at one
_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{0,63}")
# add_layer versions this reader understands (dlib >= 19.2 writes 2; 1 lacks params_grad and is indistinguishable
# from a tag/skip layer in the version run, so it cannot be supported)
_ADD_LAYER_VERSION = 2
_MARKER_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Layer records, input to output


@dataclass(frozen=True)
class LossMetric:
    margin: float
    distance_threshold: float


@dataclass(frozen=True)
class InputRGBImageSized:
    mean_rgb: tuple[float, float, float]  # subtracted from R, G, B before dividing by 256
    rows: int
    cols: int


@dataclass(frozen=True, eq=False)
class Con:
    num_filters: int
    rows: int
    cols: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int
    weights: np.ndarray  # float32 [num_filters, in_channels, rows, cols]
    biases: np.ndarray  # float32 [num_filters]

    @property
    def param_count(self) -> int:
        return int(self.weights.size + self.biases.size)


@dataclass(frozen=True, eq=False)
class Affine:
    mode: Literal["conv", "fc"]  # conv: one gamma/beta per channel; fc: one per element of (k, nr, nc)
    gamma: np.ndarray  # float32 [k] (conv) or [k, nr, nc] (fc)
    beta: np.ndarray  # same shape as gamma


@dataclass(frozen=True)
class Relu:
    pass


@dataclass(frozen=True)
class AddPrev:
    tag: int  # adds the output of the nearest tag<tag> below it


@dataclass(frozen=True)
class Pool:
    rows: int  # 0 means the whole input plane (avg_pool_everything / max_pool_everything)
    cols: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int


@dataclass(frozen=True)
class AvgPool(Pool):
    pass


@dataclass(frozen=True)
class MaxPool(Pool):
    pass


@dataclass(frozen=True, eq=False)
class Fc:
    num_outputs: int
    num_inputs: int
    weights: np.ndarray  # float32 [num_inputs, num_outputs]: output = flatten(x) @ weights (+ biases)
    biases: np.ndarray | None  # float32 [num_outputs], None for fc_no_bias


@dataclass(frozen=True)
class Tag:
    id: int


@dataclass(frozen=True)
class Skip:
    tag: int  # output is the output of the nearest tag<tag> below it


Layer = Con | Affine | Relu | AddPrev | AvgPool | MaxPool | Fc | Tag | Skip


@dataclass(frozen=True)
class DlibNetwork:
    loss: LossMetric
    input: InputRGBImageSized
    layers: tuple[Layer, ...]  # input to output, the input layer itself excluded

    def count(self, kind: type) -> int:
        return sum(isinstance(layer, kind) for layer in self.layers)


# ---------------------------------------------------------------------------------------------------------------
# Primitive decoding


class Reader:
    """A cursor over dlib-serialised bytes; every read checks bounds and names its offset on failure."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self._data = memoryview(data)
        self.offset = offset

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset

    def fail(self, expected: str, at: int | None = None) -> ModelFormatError:
        where = self.offset if at is None else at
        return ModelFormatError(f"dlib model: at byte {where}: expected {expected}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise self.fail(f"{what} ({n} bytes, {self.remaining} left)")
        chunk = self._data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def int(self, what: str = "an integer", *, signed: bool = True) -> int:
        start = self.offset
        control = self.take(1, f"the control byte of {what}")[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        # dlib rejects counts above 8 bytes; unsigned readers also reject the sign bit
        if size > 8 or (negative and not signed):
            raise self.fail(f"{what}, found control byte 0x{control:02x}", start)
        value = int.from_bytes(self.take(size, f"the {size} value bytes of {what}"), "little")
        return -value if negative else value

    def uint(self, what: str = "an unsigned integer") -> int:
        return self.int(what, signed=False)

    def string(self, what: str = "a string") -> bytes:
        length = self.uint(f"the length of {what}")
        return bytes(self.take(length, what))

    def ident(self, what: str) -> str:
        start = self.offset
        raw = self.string(what)
        if not _IDENT.fullmatch(raw):
            raise self.fail(f"{what} (a short identifier), found {raw[:32]!r}", start)
        return raw.decode("ascii")

    def float(self, what: str = "a float") -> float:
        start = self.offset
        if self.remaining and self._data[self.offset] & 0x70:
            # dlib's pre-2013 ASCII float format: its bytes always have bits 0x70 set, the binary format never does
            raise self.fail(f"{what} in dlib's binary float format (found the legacy ASCII format)", start)
        mantissa = self.int(f"the mantissa of {what}")
        exponent = self.int(f"the exponent of {what}")
        if not -(2**63) <= mantissa < 2**63 or not -(2**15) <= exponent < 2**15:
            raise self.fail(f"{what} with an int64 mantissa and int16 exponent", start)
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent > _EXP_INF:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:  # C's ldexp, which dlib uses, saturates to infinity instead
            return math.copysign(math.inf, mantissa)

    def bool(self, what: str = "a bool") -> bool:
        start = self.offset
        ch = self.take(1, what)[0]
        if ch not in (0x30, 0x31):
            raise self.fail(f"{what} as ASCII '0' or '1', found 0x{ch:02x}", start)
        return ch == 0x31

    def version(self, what: str, allowed: tuple[int, ...]) -> int:
        start = self.offset
        v = self.int(f"the version of {what}")
        if v not in allowed:
            raise self.fail(f"{what} version in {allowed}, found {v}", start)
        return v

    def tensor(self, what: str) -> np.ndarray:
        """A resizable_tensor (version 2): n, k, nr, nc, then raw little-endian float32, returned as [n, k, nr, nc]."""
        self.version(f"tensor {what}", (2,))
        dims = tuple(self._dim(f"{name} of tensor {what}") for name in ("num_samples", "k", "nr", "nc"))
        count = math.prod(dims)
        raw = self.take(4 * count, f"{count} float32 values of tensor {what}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self, what: str) -> tuple[int, int, int, int]:
        """An alias_tensor (version 1): only the dimensions n, k, nr, nc of a view into a layer's params."""
        self.version(f"alias tensor {what}", (1,))
        return tuple(self._dim(f"{name} of alias tensor {what}") for name in ("num_samples", "k", "nr", "nc"))  # type: ignore[return-value]

    def _dim(self, what: str) -> int:
        start = self.offset
        v = self.int(what)
        if not 0 <= v < 2**31:
            raise self.fail(f"{what} as a non-negative size, found {v}", start)
        return v

    def peek_ident(self) -> str | None:
        """The identifier string at the cursor, if there is one, without moving the cursor."""
        saved = self.offset
        try:
            return self.ident("an identifier")
        except ModelFormatError:
            return None
        finally:
            self.offset = saved


# ---------------------------------------------------------------------------------------------------------------
# Layer details


def _read_loss(r: Reader) -> LossMetric:
    start = r.offset
    name = r.ident("the loss layer's version string")
    if name == "loss_metric_":
        # dlib hard-coded these before it started serialising them (dlib/dnn/loss.h)
        return LossMetric(margin=0.1, distance_threshold=0.75)
    if name == "loss_metric_2":
        return LossMetric(margin=r.float("loss margin"), distance_threshold=r.float("loss distance threshold"))
    raise r.fail(f"a metric loss ('loss_metric_2'), found {name!r}", start)


def _read_input(r: Reader) -> InputRGBImageSized:
    start = r.offset
    name = r.ident("the input layer's version string")
    if name != "input_rgb_image_sized":
        raise r.fail(f"input layer 'input_rgb_image_sized', found {name!r}", start)
    means = (r.float("mean red"), r.float("mean green"), r.float("mean blue"))
    rows, cols = r.uint("input rows"), r.uint("input cols")
    return InputRGBImageSized(mean_rgb=means, rows=rows, cols=cols)


def _split_params(r: Reader, params: np.ndarray, shapes: list[tuple[int, ...]], what: str, at: int) -> list[np.ndarray]:
    """Cut a layer's flat params tensor into the consecutive views its alias tensors describe."""
    flat = params.reshape(-1)
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.size:
        raise r.fail(f"{what} params of {sum(sizes)} floats (per its alias tensors), found {flat.size}", at)
    out, pos = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[pos : pos + size].reshape(shape))
        pos += size
    return out


def _read_con(r: Reader) -> Con:
    start = r.offset
    params = r.tensor("con params")
    num_filters, rows, cols = r.int("con num_filters"), r.int("con nr"), r.int("con nc")
    stride_y, stride_x = r.int("con stride_y"), r.int("con stride_x")
    padding_y, padding_x = r.int("con padding_y"), r.int("con padding_x")
    fshape = r.alias_tensor("con filters")
    bshape = r.alias_tensor("con biases")
    for what in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        r.float(f"con {what} multiplier")
    if min(num_filters, rows, cols, stride_y, stride_x) < 1 or not (0 <= padding_y < rows and 0 <= padding_x < cols):
        raise r.fail("con geometry with positive sizes and strides and padding smaller than the filter", start)
    if fshape[0] != num_filters or fshape[2:] != (rows, cols) or math.prod(bshape) != num_filters:
        raise r.fail(f"con filter/bias shapes for {num_filters}x{rows}x{cols}, found {fshape} and {bshape}", start)
    weights, biases = _split_params(r, params, [fshape, (num_filters,)], "con", start)
    return Con(num_filters, rows, cols, stride_y, stride_x, padding_y, padding_x, weights, biases)


def _read_affine(r: Reader) -> Affine:
    start = r.offset
    params = r.tensor("affine params")
    gshape, bshape = r.alias_tensor("affine gamma"), r.alias_tensor("affine beta")
    mode = r.int("affine mode")
    if mode not in (0, 1) or gshape != bshape or gshape[0] != 1:
        raise r.fail(f"affine mode 0 or 1 with equal gamma/beta shapes, found {mode}, {gshape}, {bshape}", start)
    # CONV_MODE (0): gamma is (1, k) and scales whole channels; FC_MODE (1): gamma is (1, k, nr, nc), per element
    shape = (gshape[1],) if mode == 0 else gshape[1:]
    gamma, beta = _split_params(r, params, [shape, shape], "affine", start)
    return Affine("conv" if mode == 0 else "fc", gamma, beta)


def _read_pool(r: Reader, kind: type[Pool]) -> Pool:
    start = r.offset
    rows, cols = r.int("pool nr"), r.int("pool nc")
    stride_y, stride_x = r.int("pool stride_y"), r.int("pool stride_x")
    padding_y, padding_x = r.int("pool padding_y"), r.int("pool padding_x")
    ok_y = (rows == 0 and padding_y == 0) or (rows > 0 and 0 <= padding_y < rows)
    ok_x = (cols == 0 and padding_x == 0) or (cols > 0 and 0 <= padding_x < cols)
    if min(rows, cols) < 0 or min(stride_y, stride_x) < 1 or not (ok_y and ok_x):
        raise r.fail("pool geometry with sizes >= 0, strides >= 1 and padding smaller than the window", start)
    return kind(rows, cols, stride_y, stride_x, padding_y, padding_x)


def _read_fc(r: Reader) -> Fc:
    start = r.offset
    num_outputs, num_inputs = r.uint("fc num_outputs"), r.uint("fc num_inputs")
    params = r.tensor("fc params")
    wshape = r.alias_tensor("fc weights")
    r.alias_tensor("fc biases")  # implied by num_outputs and the bias mode
    bias_mode = r.int("fc bias mode")
    for what in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
        r.float(f"fc {what} multiplier")
    # dlib multiplies the (N, num_inputs) input by weights viewed as (num_inputs, num_outputs): tt::gemm(out, x, w)
    if bias_mode not in (0, 1) or wshape[:2] != (num_inputs, num_outputs) or wshape[2:] != (1, 1):
        raise r.fail(f"fc weights ({num_inputs}, {num_outputs}) and bias mode 0/1, found {wshape}, {bias_mode}", start)
    if bias_mode == 1:  # FC_NO_BIAS
        (weights,) = _split_params(r, params, [(num_inputs, num_outputs)], "fc", start)
        return Fc(num_outputs, num_inputs, weights, None)
    weights, biases = _split_params(r, params, [(num_inputs, num_outputs), (num_outputs,)], "fc", start)
    return Fc(num_outputs, num_inputs, weights, biases)


@dataclass(frozen=True)
class _AddPrevUnresolved:
    """An add_prev_ layer before its tag id is known (dlib writes only the name)."""


@dataclass(frozen=True)
class _Marker:
    """A tag or skip layer: the file records neither which, nor its id."""


# a parsed layer's details, with add_prev's tag id still to be filled in
_Details = Con | Affine | Relu | AvgPool | MaxPool | Fc | _AddPrevUnresolved


def _read_details(r: Reader) -> _Details:
    start = r.offset
    name = r.ident("a layer's version string")
    if name == "con_4":
        return _read_con(r)
    if name == "affine_":
        return _read_affine(r)
    if name == "relu_":
        return Relu()
    if name == "add_prev_":
        return _AddPrevUnresolved()
    if name == "avg_pool_2":
        return _read_pool(r, AvgPool)
    if name == "max_pool_2":
        return _read_pool(r, MaxPool)
    if name == "fc_2":
        return _read_fc(r)
    raise r.fail(
        f"a supported layer (con_4, affine_, relu_, add_prev_, avg_pool_2, max_pool_2, fc_2), found {name!r}", start
    )


def _read_add_layer_state(r: Reader, *, input_version: int | None = None) -> None:
    """The bookkeeping add_layer writes after its details: three bools and the training-time tensors we ignore."""
    r.bool("this_layer_setup_called")
    r.bool("gradient_input_is_stale")
    r.bool("get_output_and_gradient_input_disabled")
    r.tensor("x_grad")
    r.tensor("cached_output")
    if input_version is None:
        r.tensor("params_grad")
        return
    r.tensor("grad_final")
    if input_version >= 3:
        r.uint("_sample_expansion_factor")


# ---------------------------------------------------------------------------------------------------------------
# The whole file


def parse_dlib_network(data: bytes) -> DlibNetwork:
    """Parse a serialised `loss_metric<... input_rgb_image_sized<N>>` network into layer records."""
    r = Reader(data)
    r.version("add_loss_layer", (1,))
    loss = _read_loss(r)

    # One version per layer from the output down; the input add_layer's version is followed by the input layer's
    # name, which is how we know the run has ended.
    versions: list[tuple[int, int]] = []  # (offset, version)
    while True:
        at = r.offset
        v = r.int("a layer version")
        ident = r.peek_ident()
        if ident is not None and ident.startswith("input"):
            if v not in (2, 3):
                raise r.fail(f"input add_layer version 2 or 3, found {v}", at)
            input_version = v
            break
        if v not in (_ADD_LAYER_VERSION, _MARKER_VERSION):
            raise r.fail(
                f"layer version {_MARKER_VERSION} (tag/skip) or {_ADD_LAYER_VERSION} (add_layer), found {v}", at
            )
        versions.append((at, v))

    input_layer = _read_input(r)
    # the add_layer directly on the input holds the first computational layer
    raw: list[_Details | _Marker] = [_read_details(r)]
    _read_add_layer_state(r, input_version=input_version)
    for _at, v in reversed(versions):
        if v == _MARKER_VERSION:
            raw.append(_Marker())
            continue
        raw.append(_read_details(r))
        _read_add_layer_state(r)
    if r.remaining:
        raise r.fail(f"the end of the file after {len(raw)} layers, found {r.remaining} more bytes")

    layers = _resolve_markers(raw)
    log.debug("parsed dlib network: %d layers, input %dx%d", len(layers), input_layer.rows, input_layer.cols)
    return DlibNetwork(loss=loss, input=input_layer, layers=layers)


def _resolve_markers(raw: list[_Details | _Marker]) -> tuple[Layer, ...]:
    """Recover tag/skip kinds and ids, which dlib does not write, from the ResNet idiom they come from.

    dlib's residual blocks (dnn_face_recognition_ex.cpp, dnn_imagenet_ex.cpp) are
        residual      = add_prev1<block<tag1<SUBNET>>>
        residual_down = add_prev2<avg_pool<skip1<tag2<block<tag1<SUBNET>>>>>>
    so, input to output, a lone pass-through layer is tag1 and a pair is tag2 then skip1. An add_prev adds the
    nearest tag below it, as dlib's layer<tagN>(sub) finds the nearest one with its id. Longer runs do not occur in
    these networks and are refused rather than guessed.
    """
    out: list[Layer] = []
    i = 0
    while i < len(raw):
        item = raw[i]
        if isinstance(item, _Marker):
            run = 1
            while i + run < len(raw) and isinstance(raw[i + run], _Marker):
                run += 1
            if run == 1:
                out.append(Tag(1))
            elif run == 2:
                out.extend((Tag(2), Skip(1)))
            else:
                raise ModelFormatError(f"dlib model: {run} consecutive tag/skip layers; only runs of 1 or 2 are known")
            i += run
            continue
        if isinstance(item, _AddPrevUnresolved):
            tag = next((x.id for x in reversed(out) if isinstance(x, Tag)), None)
            if tag is None:
                raise ModelFormatError(f"dlib model: layer {len(out)} (add_prev) has no tag layer below it")
            out.append(AddPrev(tag))
        else:
            out.append(item)
        i += 1
    return tuple(out)
