"""TensorRT on NVIDIA GPUs (Jetson first): an engine built on the device from the ONNX, cached, run with pycuda.

`tensorrt` and `pycuda` are imported inside functions only, so this module imports (and its pure helpers,
`engine_cache_key`, `cast_onnx_to_fp16`, `uses_strong_typing`, are testable) on machines without them.

Which TensorRT API paths are used, by feature detection rather than version lists where possible:

* Building. TensorRT < 10.12 (JetPack 5's 8.5, JetPack 6's 10.3): weakly typed network, FP16 via
  `BuilderFlag.FP16`, `NetworkDefinitionCreationFlag.EXPLICIT_BATCH` on 8.x only (ignored from 10.0, gone in 11),
  `fp32_layers` pinned with `layer.precision` / `set_output_type` + `OBEY_PRECISION_CONSTRAINTS`.
  TensorRT >= 10.12 (and 11, where weak typing, `BuilderFlag.FP16` and per-layer precision are removed): a
  strongly typed network (`STRONGLY_TYPED`, a no-op in 11 where it is always on), so precision comes from the
  ONNX types: for "fp16" the graph is first rewritten by `cast_onnx_to_fp16` (float tensors on the data path
  become float16, graph inputs/outputs stay float32, `fp32_layers` nodes stay float32).
* Running. Named tensors (`set_input_shape`, `set_tensor_address`, `execute_async_v3`; TensorRT >= 8.5,
  the only API in 10.x) or, on older 8.x, bindings (`set_binding_shape`, `execute_async_v2`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from models.backends.base import PRECISIONS, InferenceBackend, ShapeProfile
from models.cache import atomic_write_bytes, cache_dir
from models.errors import BackendError, BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

# Bump when the way engines are built changes (flags, the fp16 rewrite), so that cached engines get rebuilt.
ENGINE_FORMAT = 1
# Weak typing (and BuilderFlag.FP16) is deprecated from this version and removed in 11.
STRONG_TYPING_FROM = (10, 12)
# Enough for these small CNNs; capped because Jetsons share one memory between CPU and GPU.
WORKSPACE_BYTES = 1 << 30

_INSTALL_HINT = (
    "install TensorRT's Python bindings and pycuda (JetPack ships python3-libnvinfer; elsewhere "
    "pip install 'faceattend[tensorrt]'), or use the onnxruntime backend"
)


# --------------------------------------------------------------------------------------------------- pure helpers


def engine_cache_key(
    *,
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    precision: str,
    profile: ShapeProfile,
    fp32_layers: Sequence[str] = (),
) -> str:
    """sha256 over everything a serialized engine depends on; engines are not portable across any of these."""
    fields = {
        "format": ENGINE_FORMAT,
        "onnx": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "sm": f"{compute_capability[0]}.{compute_capability[1]}",
        "precision": precision,
        "profile": profile.key(),
        "fp32_layers": sorted(set(fp32_layers)),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def uses_strong_typing(trt_version: str) -> bool:
    """Whether to build strongly typed networks with this TensorRT version (see STRONG_TYPING_FROM)."""
    nums = [int(n) for n in re.findall(r"\d+", trt_version)[:2]]
    return tuple(nums + [0] * (2 - len(nums))) >= STRONG_TYPING_FROM


def matching_node_names(model: Any, patterns: Sequence[str]) -> set[str]:
    """Names of ONNX nodes whose name or op type matches one of the fnmatch patterns."""
    return {
        n.name
        for n in model.graph.node
        if any(fnmatch.fnmatchcase(n.name, p) or fnmatch.fnmatchcase(n.op_type, p) for p in patterns)
    }


# Inputs that the ONNX spec types as float32 whatever the data type ("scales") or that are shape-like: left alone.
_UNTOUCHED_INPUTS = {"Resize": {1, 2, 3}, "Upsample": {1}}
# No float16 variant in the ONNX spec.
_FP32_ONLY_OPS = {"NonMaxSuppression"}
_FP16_MAX = float(np.finfo(np.float16).max)


def cast_onnx_to_fp16(model_bytes: bytes, keep_fp32: Sequence[str] = ()) -> bytes:
    """Rewrite a float32 ONNX graph so that its data path computes in float16; inputs and outputs stay float32.

    Only tensors derived from the graph inputs ("activations") and the weights and constants feeding them are
    converted; shape arithmetic is left as it is. Nodes matching `keep_fp32` (fnmatch on node name or op type)
    run in float32 with casts around them. This is what gives a strongly typed TensorRT network its precision.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    try:
        model = onnx.shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    except Exception as exc:  # onnx raises DecodeError / InferenceError / ValidationError
        raise BackendError(f"fp16 rewrite: cannot read the ONNX model: {exc}") from exc
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise BackendError("fp16 rewrite: control-flow subgraphs are not supported; use precision='fp32'")

    elem = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # constants reachable without computation: Constant nodes and Identity of constants
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    for name, value in consts.items():
        elem.setdefault(name, helper.np_dtype_to_tensor_dtype(value.dtype))

    keep = matching_node_names(model, keep_fp32)
    graph_inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    act: dict[str, int] = {}  # activation tensor -> its element type after the rewrite
    nodes: list[Any] = []
    new_inits: list[Any] = []
    converted: dict[tuple[str, int], str] = {}

    def as_type(name: str, to: int) -> str:
        """The name of `name` converted to `to`: an fp16 copy of a constant, else a Cast node (made once)."""
        if (name, to) not in converted:
            suffix = "__fp16" if to == HALF else "__fp32"
            if to == HALF and name in consts and name not in act:
                value = np.clip(consts[name], -_FP16_MAX, _FP16_MAX).astype(np.float16)
                new_inits.append(numpy_helper.from_array(value, name + suffix))
            else:
                nodes.append(helper.make_node("Cast", [name], [name + suffix], to=to, name=name + suffix))
            converted[(name, to)] = name + suffix
        return converted[(name, to)]

    for name in graph_inputs:
        if elem.get(name) == FLOAT:
            act[name] = FLOAT
    for node in graph.node:
        if not any(i in act for i in node.input):
            nodes.append(node)  # not on the data path (weights, shape arithmetic): unchanged
            continue
        want = FLOAT if (node.name in keep or node.op_type in _FP32_ONLY_OPS) else HALF
        untouched = _UNTOUCHED_INPUTS.get(node.op_type, set())
        for k, name in enumerate(node.input):
            if not name or k in untouched:
                continue
            current = act.get(name, elem.get(name))
            if current in (FLOAT, HALF) and current != want:
                node.input[k] = as_type(name, want)
        if node.op_type == "Cast" and want == HALF:
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = HALF
        for out in node.output:
            if not out:
                continue
            if out not in elem:
                raise BackendError(f"fp16 rewrite: ONNX shape inference gave no type for {out!r} ({node.op_type})")
            if elem[out] == FLOAT:  # also Cast(to=FLOAT) outputs, whose `to` was just rewritten
                act[out] = want
        nodes.append(node)

    # Outputs keep their names and float32 type: the producer writes a __fp16 tensor, a final Cast restores it.
    for out in graph.output:
        if act.get(out.name) == HALF:
            inner = out.name + "__fp16"
            for n in nodes:
                for field in (n.input, n.output):
                    for k, name in enumerate(field):
                        if name == out.name:
                            field[k] = inner
            nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=out.name + "__to_fp32"))

    # Drop Constant/Identity nodes (and then initializers) whose only consumers now read fp16 copies.
    used = {o.name for o in graph.output}
    alive: list[Any] = []
    for n in reversed(nodes):
        if n.op_type in ("Constant", "Identity") and not any(o in used for o in n.output):
            continue
        alive.append(n)
        used.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    inits = [t for t in graph.initializer if t.name in used] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]  # stale types; TensorRT and checkers re-infer them
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BackendError(f"fp16 rewrite produced an invalid model: {exc}") from exc
    return model.SerializeToString()


# ------------------------------------------------------------------------------------------- runtime plumbing


def _import_runtime() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError from a missing libnvinfer
        raise BackendUnavailableError(f"TensorRT backend: cannot import tensorrt ({exc}); {_INSTALL_HINT}") from exc
    try:
        import pycuda.driver as cuda
    except Exception as exc:
        raise BackendUnavailableError(f"TensorRT backend: cannot import pycuda ({exc}); {_INSTALL_HINT}") from exc
    return trt, cuda


_trt_logger_instance: Any = None


def _trt_logger(trt: Any) -> Any:
    """One process-wide ILogger forwarding to `logging` (TensorRT warns when builder and runtime loggers differ)."""
    global _trt_logger_instance
    if _trt_logger_instance is None:
        sev = trt.ILogger.Severity
        levels = {
            sev.INTERNAL_ERROR: logging.ERROR,
            sev.ERROR: logging.ERROR,
            sev.WARNING: logging.WARNING,
            sev.INFO: logging.DEBUG,  # TensorRT's INFO is chatty
            sev.VERBOSE: 5,
        }

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

        _trt_logger_instance = _Logger()
    return _trt_logger_instance


def _progress_monitor(trt: Any, label: str) -> Any:
    """An IProgressMonitor (TensorRT >= 10) logging top-level build phases, or None where there is none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            level = logging.INFO if parent_phase is None else logging.DEBUG
            log.log(level, "%s: TensorRT build phase %r started (%d steps)", label, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel the build

        def phase_finish(self, phase_name: str) -> None:
            log.debug("%s: TensorRT build phase %r finished", label, phase_name)

    return _Monitor()


def _pin_fp32_layers(trt: Any, network: Any, config: Any, patterns: Sequence[str], node_names: set[str]) -> int:
    """Weak typing only: keep matching layers in FP32. The ONNX parser names layers after their ONNX nodes."""
    float_types = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        name = layer.name
        hit = any(fnmatch.fnmatchcase(name, p) for p in patterns) or any(
            name == n or name.startswith(n + "_") for n in node_names
        )
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in float_types]
        if not hit or not outputs:
            continue
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    flag = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None) or trt.BuilderFlag.STRICT_TYPES  # < 8.2
    config.set_flag(flag)
    return pinned


def _build_plan(
    trt: Any,
    onnx_bytes: bytes,
    *,
    label: str,
    profile: ShapeProfile,
    precision: str,
    fp32_layers: Sequence[str],
    strong: bool,
) -> bytes:
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    model = cast_onnx_to_fp16(onnx_bytes, fp32_layers) if strong and precision == "fp16" else onnx_bytes
    if not parser.parse(model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{label}: TensorRT could not parse the ONNX model: {errors or 'no details'}")
    if network.num_inputs != 1:
        raise BackendError(f"{label}: expected one network input, the ONNX model has {network.num_inputs}")
    net_input = network.get_input(0)
    if len(net_input.shape) != len(profile.min_shape):
        raise BackendError(f"{label}: input {net_input.name} has rank {len(net_input.shape)}, profile {profile.key()}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    else:
        config.max_workspace_size = WORKSPACE_BYTES
    if precision == "fp16" and not strong:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("%s: this GPU has no fast FP16; TensorRT may fall back to FP32 kernels", label)
        config.set_flag(trt.BuilderFlag.FP16)
        if fp32_layers:
            import onnx

            nodes = matching_node_names(onnx.load_from_string(onnx_bytes), fp32_layers)
            pinned = _pin_fp32_layers(trt, network, config, fp32_layers, nodes)
            log.info("%s: %d layers kept in FP32 (%s)", label, pinned, ", ".join(fp32_layers))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" is the accuracy reference: no reduced-mantissa matmuls

    opt = builder.create_optimization_profile()
    opt.set_shape(net_input.name, profile.min_shape, profile.opt_shape, profile.max_shape)
    config.add_optimization_profile(opt)
    monitor = _progress_monitor(trt, label)
    if monitor is not None:
        config.progress_monitor = monitor

    typing_mode = "strongly typed" if strong else "weakly typed"
    log.info(
        "%s: building TensorRT %s engine (%s, %s, profile %s); this takes minutes on a Jetson",
        label,
        precision,
        trt.__version__,
        typing_mode,
        profile.key(),
    )
    started = time.monotonic()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{label}: TensorRT failed to build the engine (see the TensorRT errors logged above)")
    log.info("%s: built TensorRT engine in %.1f s", label, time.monotonic() - started)
    return bytes(plan)


def _deserialize(runtime: Any, plan: bytes) -> Any:
    """The engine, or None when the plan is corrupt or from another TensorRT version/GPU."""
    try:
        return runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # some versions raise instead of returning None
        log.debug("deserialize_cuda_engine raised: %s", exc)
        return None


class _NamedTensorIO:
    """TensorRT >= 8.5 (and the only API in 10+): tensors addressed by name, execute_async_v3."""

    def __init__(self, trt: Any, engine: Any, context: Any) -> None:
        self._ctx = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}

    def set_input_shape(self, shape: tuple[int, ...]) -> bool:
        return bool(self._ctx.set_input_shape(self.inputs[0], shape))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._ctx.get_tensor_shape(name))

    def bind(self, addresses: dict[str, int]) -> None:
        for name, address in addresses.items():
            if not self._ctx.set_tensor_address(name, address):
                raise BackendError(f"TensorRT rejected the device buffer for {name!r}")

    def execute(self, stream_handle: int) -> bool:
        return bool(self._ctx.execute_async_v3(stream_handle))


class _BindingIO:
    """TensorRT 8.0-8.4: binding indices, execute_async_v2 (removed in 10)."""

    def __init__(self, trt: Any, engine: Any, context: Any) -> None:
        self._ctx = context
        self._names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
        self._index = {n: i for i, n in enumerate(self._names)}
        self.inputs = [n for i, n in enumerate(self._names) if engine.binding_is_input(i)]
        self.outputs = [n for n in self._names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_binding_dtype(i))) for i, n in enumerate(self._names)}
        self._bindings: list[int] = []

    def set_input_shape(self, shape: tuple[int, ...]) -> bool:
        return bool(self._ctx.set_binding_shape(self._index[self.inputs[0]], shape))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._ctx.get_binding_shape(self._index[name]))

    def bind(self, addresses: dict[str, int]) -> None:
        self._bindings = [addresses[n] for n in self._names]

    def execute(self, stream_handle: int) -> bool:
        return bool(self._ctx.execute_async_v2(bindings=self._bindings, stream_handle=stream_handle))


def _onnx_output_names(onnx_bytes: bytes) -> list[str]:
    import onnx

    try:
        return [o.name for o in onnx.load_from_string(onnx_bytes).graph.output]
    except Exception as exc:
        raise BackendError(f"cannot read the ONNX model: {exc}") from exc


# ------------------------------------------------------------------------------------------------ the backend


class TensorRTBackend(InferenceBackend):
    """One engine, one execution context, one CUDA stream; buffers allocated once at the profile's max shape.

    `cache_hit` tells whether the engine came from the cache (False: it was built by this constructor).
    Calls to `run` are serialised by a lock: the pinned and device buffers are shared.
    """

    name = "tensorrt"

    def __init__(
        self,
        onnx: bytes | Path,
        *,
        label: str,
        profile: ShapeProfile,
        precision: str = "fp16",
        cache: Path | None = None,
        fp32_layers: Sequence[str] = (),
        device: int = 0,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"{label}: TensorRT precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self._label = label
        self._profile = profile
        self._lock = threading.Lock()
        self._cu_ctx: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        self.cache_hit = False

        try:
            onnx_bytes = onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes()
        except OSError as exc:
            raise BackendError(f"{label}: cannot read the ONNX model {onnx}: {exc}") from exc
        trt, cuda = _import_runtime()
        self._cuda = cuda
        try:
            cuda.init()
            if device >= cuda.Device.count():
                raise BackendUnavailableError(f"{label}: no CUDA device {device} (found {cuda.Device.count()})")
            dev = cuda.Device(device)
            gpu_name, capability = dev.name(), tuple(dev.compute_capability())
            # The primary context is the one TensorRT's CUDA runtime calls use; pushing it around every call
            # (instead of pycuda.autoinit) lets any thread use the backend.
            self._cu_ctx = dev.retain_primary_context()
        except BackendError:
            raise
        except Exception as exc:  # pycuda.driver.Error and friends
            raise BackendUnavailableError(f"{label}: CUDA is not usable here: {exc}") from exc

        try:
            with self._cuda_context():
                strong = uses_strong_typing(trt.__version__) or not hasattr(trt.BuilderFlag, "FP16")
                key = engine_cache_key(
                    onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
                    trt_version=trt.__version__,
                    gpu_name=gpu_name,
                    compute_capability=(int(capability[0]), int(capability[1])),
                    precision=precision,
                    profile=profile,
                    fp32_layers=fp32_layers,
                )
                safe_label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
                self.engine_path = (cache or cache_dir() / "tensorrt") / f"{safe_label}-{precision}-{key[:24]}.engine"
                self._runtime = trt.Runtime(_trt_logger(trt))
                self._engine = self._load_or_build(
                    trt, onnx_bytes, precision=precision, fp32_layers=fp32_layers, strong=strong
                )
                self._setup(trt, cuda, _onnx_output_names(onnx_bytes))
        except BaseException:
            self.close()
            raise

    # ---- construction

    def _load_or_build(
        self, trt: Any, onnx_bytes: bytes, *, precision: str, fp32_layers: Sequence[str], strong: bool
    ) -> Any:
        path = self.engine_path
        if path.is_file():
            try:
                engine = _deserialize(self._runtime, path.read_bytes())
            except OSError as exc:
                log.warning("%s: cannot read cached engine %s (%s); rebuilding", self._label, path, exc)
                engine = None
            if engine is not None:
                log.info("%s: loaded TensorRT engine from cache %s", self._label, path)
                self.cache_hit = True
                return engine
            log.warning("%s: cached engine %s is corrupt or incompatible; rebuilding", self._label, path)
        plan = _build_plan(
            trt,
            onnx_bytes,
            label=self._label,
            profile=self._profile,
            precision=precision,
            fp32_layers=fp32_layers,
            strong=strong,
        )
        try:
            atomic_write_bytes(path, plan)
        except OSError as exc:  # a read-only cache must not stop inference; the next start rebuilds
            log.warning("%s: cannot cache the engine at %s: %s", self._label, path, exc)
        engine = _deserialize(self._runtime, plan)
        if engine is None:
            raise BackendError(f"{self._label}: TensorRT could not load the engine it just built")
        return engine

    def _setup(self, trt: Any, cuda: Any, onnx_outputs: list[str]) -> None:
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{self._label}: TensorRT could not create an execution context (out of memory?)")
        named = hasattr(self._engine, "num_io_tensors") and hasattr(self._context, "execute_async_v3")
        io: _NamedTensorIO | _BindingIO = (_NamedTensorIO if named else _BindingIO)(trt, self._engine, self._context)
        if len(io.inputs) != 1 or sorted(io.outputs) != sorted(onnx_outputs):
            raise BackendError(
                f"{self._label}: engine tensors {io.inputs} -> {io.outputs} do not match the ONNX model's "
                f"single input and outputs {onnx_outputs}"
            )
        self._io = io
        self._input = io.inputs[0]
        self._outputs = tuple(onnx_outputs)  # the ONNX graph's order, as the interface promises

        # Output sizes at the largest input shape bound every call's sizes (output volume grows with the input).
        if not io.set_input_shape(self._profile.max_shape):
            raise BackendError(f"{self._label}: engine rejects the profile's max shape {self._profile.max_shape}")
        shapes = {self._input: self._profile.max_shape} | {n: io.shape(n) for n in self._outputs}
        for name, shape in shapes.items():
            if any(d < 0 for d in shape):
                raise BackendError(f"{self._label}: output {name!r} has a data-dependent shape {shape}")
            self._host[name] = cuda.pagelocked_empty(max(prod(shape), 1), io.dtypes[name])
            self._device[name] = cuda.mem_alloc(self._host[name].nbytes)
        io.bind({n: int(d) for n, d in self._device.items()})
        self._stream = cuda.Stream()
        mib = sum(h.nbytes for h in self._host.values()) / 2**20
        log.info("%s: TensorRT ready (%s API, %.1f MiB of I/O buffers)", self._label, type(io).__name__, mib)

    @contextlib.contextmanager
    def _cuda_context(self) -> Iterator[None]:
        self._cu_ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    # ---- the interface

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._context is None:
            raise BackendError(f"{self._label}: the TensorRT backend is closed")
        if not isinstance(batch, np.ndarray):
            raise BackendError(f"{self._label}: expected a numpy array, got {type(batch).__name__}")
        shape = tuple(int(d) for d in batch.shape)
        if not self._profile.admits(shape):
            p = self._profile
            raise BackendError(
                f"{self._label}: input shape {shape} is outside the engine profile {p.min_shape}..{p.max_shape}"
            )
        cuda = self._cuda
        with self._lock, self._cuda_context():
            try:
                if not self._io.set_input_shape(shape):
                    raise BackendError(f"{self._label}: TensorRT rejected input shape {shape}")
                host_in = self._host[self._input][: prod(shape)]
                np.copyto(host_in.reshape(shape), batch, casting="unsafe")
                cuda.memcpy_htod_async(self._device[self._input], host_in, self._stream)  # only the used bytes
                if not self._io.execute(self._stream.handle):
                    raise BackendError(f"{self._label}: TensorRT execution failed on {shape}")
                views = []
                for name in self._outputs:
                    out_shape = self._io.shape(name)
                    size = prod(out_shape)
                    if size > self._host[name].size or any(d < 0 for d in out_shape):
                        raise BackendError(f"{self._label}: output {name!r} shape {out_shape} exceeds its buffer")
                    view = self._host[name][:size]
                    cuda.memcpy_dtoh_async(view, self._device[name], self._stream)
                    views.append(view.reshape(out_shape))
                self._stream.synchronize()
            except BackendError:
                raise
            except Exception as exc:  # pycuda.driver.Error, TensorRT RuntimeError
                raise BackendError(f"{self._label}: TensorRT inference failed on {shape}: {exc}") from exc
            # Copies: the pinned buffers are overwritten by the next call.
            return [v.astype(np.float32, copy=True) for v in views]

    def close(self) -> None:
        if self._cu_ctx is None:
            return
        with self._lock:
            self._cu_ctx.push()
            try:
                # TensorRT objects and CUDA memory must go while their context is current; context before engine.
                self._context = None
                self._engine = None
                self._runtime = None  # the runtime must outlive its engines
                for mem in self._device.values():
                    mem.free()
                self._device.clear()
                self._host.clear()
                self._stream = None
            finally:
                self._cuda.Context.pop()
                self._cu_ctx.detach()
                self._cu_ctx = None
