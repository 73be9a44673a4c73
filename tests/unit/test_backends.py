"""Backends without a GPU: ONNX Runtime on the real detector, the factory, the TensorRT backend's pure helpers,
and the TensorRT backend's own logic (cache, buffers, both execution APIs) against a fake tensorrt/pycuda."""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.backends import BACKENDS, create_backend, tensorrt_available
from models.backends import tensorrt_backend as trt_backend
from models.backends.base import ShapeProfile
from models.backends.tensorrt_backend import cast_onnx_to_fp16, engine_cache_key, uses_strong_typing
from models.errors import BackendError, BackendUnavailableError, ConfigError

DETECTOR_OUTPUTS = {"loc": 4, "conf": 2, "landmarks": 10}


def anchors(h: int, w: int) -> int:
    """RetinaFace-mnet0.25: two anchors per cell on stride 8, 16 and 32 maps (h, w multiples of 32)."""
    return sum(2 * (h // s) * (w // s) for s in (8, 16, 32))


def detector_input(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    # BGR pixels minus the (104, 117, 123) mean: roughly -123..151
    return np.random.default_rng(seed).uniform(-123, 151, (n, 3, h, w)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ ONNX Runtime


@pytest.mark.parametrize(("n", "h", "w"), [(1, 480, 640), (4, 128, 160)])
def test_onnxruntime_detector_shapes(detector_onnx: bytes, n: int, h: int, w: int) -> None:
    backend = create_backend("onnxruntime", detector_onnx, label="detector", threads=2)
    assert backend.output_names == tuple(DETECTOR_OUTPUTS)
    outputs = backend.run(detector_input(n, h, w))
    assert len(outputs) == 3
    for out, width in zip(outputs, DETECTOR_OUTPUTS.values(), strict=True):
        assert out.shape == (n, anchors(h, w), width)
        assert out.dtype == np.float32
    np.testing.assert_allclose(outputs[1].sum(axis=-1), 1.0, atol=1e-5)  # conf is a softmax


def test_onnxruntime_wrong_rank_is_backend_error(detector_onnx: bytes) -> None:
    backend = create_backend("onnxruntime", detector_onnx, label="detector")
    with pytest.raises(BackendError, match="detector"):
        backend.run(np.zeros((3, 64, 64), np.float32))


# ------------------------------------------------------------------------------------------------- the factory


def test_unknown_backend_is_config_error(detector_onnx: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        create_backend("openvino", detector_onnx, label="detector")
    for kind in BACKENDS:
        assert kind in str(info.value)


def test_bad_precision_is_config_error(detector_onnx: bytes) -> None:
    with pytest.raises(ConfigError, match="int8"):
        create_backend("onnxruntime", detector_onnx, label="detector", precision="int8")


def test_tensorrt_needs_a_profile(detector_onnx: bytes) -> None:
    with pytest.raises(ConfigError, match="ShapeProfile"):
        create_backend("tensorrt", detector_onnx, label="detector")


PROFILE = ShapeProfile((1, 3, 32, 32), (2, 3, 64, 64), (4, 3, 96, 128))


def test_tensorrt_missing_is_unavailable(detector_onnx: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, here and on GPU hosts
    with pytest.raises(BackendUnavailableError, match="tensorrt") as info:
        create_backend("tensorrt", detector_onnx, label="detector", profile=PROFILE)
    assert "onnxruntime" in str(info.value)  # the message says what to do instead
    ok, reason = tensorrt_available()
    assert not ok
    assert "tensorrt" in reason


def test_tensorrt_available_never_raises() -> None:
    ok, reason = tensorrt_available()
    assert isinstance(ok, bool)
    assert reason


# -------------------------------------------------------------------------------------------- pure helpers


def test_shape_profile_admits() -> None:
    assert PROFILE.admits((1, 3, 32, 32))
    assert PROFILE.admits((4, 3, 96, 128))
    assert PROFILE.admits((3, 3, 64, 100))
    assert not PROFILE.admits((5, 3, 64, 64))  # batch too large
    assert not PROFILE.admits((1, 3, 16, 64))  # too small
    assert not PROFILE.admits((1, 1, 64, 64))  # channels fixed
    assert not PROFILE.admits((1, 3, 64, 129))
    assert not PROFILE.admits((3, 64, 64))  # wrong rank
    assert PROFILE.key() == "1x3x32x32-2x3x64x64-4x3x96x128"


KEY_ARGS: dict[str, Any] = {
    "onnx_sha256": "ab" * 32,
    "trt_version": "10.3.0",
    "gpu_name": "Orin",
    "compute_capability": (8, 7),
    "precision": "fp16",
    "profile": PROFILE,
    "fp32_layers": (),
}
KEY_CHANGES: dict[str, Any] = {
    "onnx_sha256": "cd" * 32,
    "trt_version": "10.3.1",
    "gpu_name": "Xavier",
    "compute_capability": (7, 2),
    "precision": "fp32",
    "profile": dataclasses.replace(PROFILE, max_shape=(8, 3, 96, 128)),
    "fp32_layers": ("*InstanceNormalization*",),
}


def test_engine_cache_key_is_stable() -> None:
    key = engine_cache_key(**KEY_ARGS)
    assert key == engine_cache_key(**KEY_ARGS)
    assert len(key) == 64 and int(key, 16) >= 0
    # the order of fp32 patterns does not matter
    a = engine_cache_key(**{**KEY_ARGS, "fp32_layers": ("a", "b")})
    assert a == engine_cache_key(**{**KEY_ARGS, "fp32_layers": ("b", "a")})


@pytest.mark.parametrize("field", sorted(KEY_CHANGES))
def test_engine_cache_key_changes_with_each_input(field: str) -> None:
    assert engine_cache_key(**{**KEY_ARGS, field: KEY_CHANGES[field]}) != engine_cache_key(**KEY_ARGS)


@pytest.mark.parametrize(
    ("version", "strong"),
    [
        ("8.2.1.8", False),
        ("8.6.2", False),
        ("10.3.0", False),
        ("10.11.0.33", False),
        ("10.12.0.36", True),
        ("11.0", True),
    ],
)
def test_uses_strong_typing(version: str, strong: bool) -> None:
    assert uses_strong_typing(version) is strong


def _types(model: onnx.ModelProto) -> tuple[list[int], list[int]]:
    return [i.type.tensor_type.elem_type for i in model.graph.input], [
        o.type.tensor_type.elem_type for o in model.graph.output
    ]


def test_cast_onnx_to_fp16_detector(detector_onnx: bytes) -> None:
    half = cast_onnx_to_fp16(detector_onnx)
    model = onnx.load_from_string(half)
    onnx.checker.check_model(model, full_check=True)
    assert _types(model) == ([onnx.TensorProto.FLOAT], [onnx.TensorProto.FLOAT] * 3)  # I/O stays float32
    assert {t.data_type for t in model.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    assert len(half) < 0.6 * len(detector_onnx)  # no float32 weights left behind

    x = detector_input(1, 128, 160)
    ref = ort.InferenceSession(detector_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = ort.InferenceSession(half, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32
        assert np.abs(r - g).max() <= 0.02 * max(1.0, np.abs(r).max())


def test_cast_onnx_to_fp16_keeps_matching_nodes_fp32(detector_onnx: bytes) -> None:
    model = onnx.load_from_string(cast_onnx_to_fp16(detector_onnx, keep_fp32=["Softmax"]))
    onnx.checker.check_model(model, full_check=True)
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax.input[0].endswith("__fp32")  # fed through a Cast back to float32
    assert softmax.output[0] == "conf"  # and writes the float32 output directly
    assert not [n for n in model.graph.node if n.name == "conf__to_fp32"]


def test_cast_onnx_to_fp16_rejects_garbage() -> None:
    with pytest.raises(BackendError):
        cast_onnx_to_fp16(b"not an onnx model")


# ------------------------------------------------------- TensorRTBackend against a fake tensorrt + pycuda
#
# No GPU here: the fakes implement just the API surface the backend uses (TensorRT 8.x bindings, 10.x named
# tensors, 10.12+ strong typing) and "execute" the parsed ONNX with ONNX Runtime over fake device memory.
# They check the backend's own logic (cache, buffers, shapes, copies), not TensorRT itself: tests/gpu does that.


class _Sev(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeCuda(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.memory: dict[int, np.ndarray] = {}
        self.depth = 0  # context push/pop balance
        cuda = self

        class Ctx:
            def push(self) -> None:
                cuda.depth += 1

            def detach(self) -> None:
                cuda.detached = True

        class Device:
            count = staticmethod(lambda: 1)

            def __init__(self, index: int) -> None:
                pass

            def name(self) -> str:
                return "Fake Orin"

            def compute_capability(self) -> tuple[int, int]:
                return (8, 7)

            def retain_primary_context(self) -> Ctx:
                return Ctx()

        class Context:
            @staticmethod
            def pop() -> None:
                cuda.depth -= 1

        class Allocation:
            def __init__(self, nbytes: int) -> None:
                self.address = 4096 * (len(cuda.memory) + 1)
                cuda.memory[self.address] = np.zeros(nbytes, np.uint8)

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                del cuda.memory[self.address]

        class Stream:
            handle = 7

            def synchronize(self) -> None:
                pass

        self.Device, self.Context, self.Stream = Device, Context, Stream
        self.mem_alloc = Allocation
        self.detached = False
        self.copied: list[int] = []

    def init(self) -> None:
        pass

    def pagelocked_empty(self, size: int, dtype: Any) -> np.ndarray:
        return np.empty(size, dtype)

    def memcpy_htod_async(self, dest: Any, src: np.ndarray, stream: Any) -> None:
        assert src.flags.c_contiguous
        self.memory[int(dest)][: src.nbytes] = src.view(np.uint8)
        self.copied.append(src.nbytes)

    def memcpy_dtoh_async(self, dest: np.ndarray, src: Any, stream: Any) -> None:
        dest.view(np.uint8)[:] = self.memory[int(src)][: dest.nbytes]
        self.copied.append(dest.nbytes)


def make_fake_trt(version: str, cuda: FakeCuda) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    named_api = not version.startswith("8.")
    strong_only = version.startswith("11.")
    trt.float32, trt.float16 = "float32", "float16"
    trt.nptype = lambda dtype: np.float32
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    flags = {"TF32": 1, "OBEY_PRECISION_CONSTRAINTS": 2} | ({} if strong_only else {"FP16": 0})
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.builds = []  # what each build was asked for

    class ILogger:
        Severity = _Sev

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger
    if named_api:

        class IProgressMonitor:
            def __init__(self) -> None:
                pass

        trt.IProgressMonitor = IProgressMonitor

    class Network:
        num_layers = 0

        def __init__(self, flags: int) -> None:
            self.flags = flags

        @property
        def num_inputs(self) -> int:
            return len(self.model.graph.input)

        def get_input(self, i: int) -> Any:
            inp = self.model.graph.input[i]
            return types.SimpleNamespace(name=inp.name, shape=[-1] * len(inp.type.tensor_type.shape.dim))

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any) -> None:
            self.network = network

        def parse(self, data: bytes) -> bool:
            self.network.model = onnx.load_from_string(data)
            self.network.data = data
            return True

    class Config:
        def __init__(self) -> None:
            self.flags: set[int] = {trt.BuilderFlag.TF32}
            self.profiles: list[Any] = []
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool: int, size: int) -> None:
            self.workspace = size

        def set_flag(self, flag: int) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: int) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            self.profiles.append(profile)

    class Profile:
        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes = (name, tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger: Any) -> None:
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            trt.builds.append({"flags": network.flags, "config": config, "model": network.model})
            return b"FAKEPLAN" + network.data

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shape, self.addresses = engine, None, {}

        def _out_shape(self, name: str) -> tuple[int, ...]:
            zeros = np.zeros(self.shape, np.float32)
            return self.engine.session.run([name], {self.engine.input: zeros})[0].shape

        def _execute(self) -> bool:
            count = int(np.prod(self.shape))
            x = cuda.memory[self.addresses[self.engine.input]][: 4 * count].view(np.float32).reshape(self.shape)
            outs = self.engine.session.run(self.engine.outputs, {self.engine.input: x})
            for name, out in zip(self.engine.outputs, outs, strict=True):
                flat = np.ascontiguousarray(out, np.float32).view(np.uint8).ravel()
                cuda.memory[self.addresses[name]][: flat.size] = flat
            return True

        # TensorRT >= 8.5 / 10.x
        def set_input_shape(self, name: str, shape: Any) -> bool:
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shape if name == self.engine.input else self._out_shape(name)

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            return self._execute()

        # TensorRT 8.0-8.4
        def set_binding_shape(self, index: int, shape: Any) -> bool:
            self.shape = tuple(shape)
            return True

        def get_binding_shape(self, index: int) -> tuple[int, ...]:
            return self.get_tensor_shape(self.engine.names[index])

        def execute_async_v2(self, bindings: list[int], stream_handle: int) -> bool:
            self.addresses = dict(zip(self.engine.names, bindings, strict=True))
            return self._execute()

    class Engine:
        def __init__(self, data: bytes) -> None:
            self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.outputs = [o.name for o in self.session.get_outputs()][::-1]  # not the ONNX order, on purpose
            self.names = [self.input, *self.outputs]

        def create_execution_context(self) -> Context:
            return Context(self)

    if named_api:
        Engine.num_io_tensors = property(lambda self: len(self.names))
        Engine.get_tensor_name = lambda self, i: self.names[i]
        Engine.get_tensor_mode = lambda self, n: "in" if n == self.input else "out"
        Engine.get_tensor_dtype = lambda self, n: trt.float32
    else:
        del Context.set_input_shape, Context.execute_async_v3
        Engine.num_bindings = property(lambda self: len(self.names))
        Engine.get_binding_name = lambda self, i: self.names[i]
        Engine.binding_is_input = lambda self, i: i == 0
        Engine.get_binding_dtype = lambda self, i: trt.float32

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine(plan[8:]) if plan.startswith(b"FAKEPLAN") else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install fake tensorrt + pycuda modules; call with a TensorRT version string."""

    def install(version: str) -> tuple[types.ModuleType, FakeCuda]:
        cuda = FakeCuda()
        trt = make_fake_trt(version, cuda)
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = cuda
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "pycuda", pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
        monkeypatch.setattr(trt_backend, "_trt_logger_instance", None)
        return trt, cuda

    return install


def _check_against_ort(backend: Any, onnx_bytes: bytes, shapes: list[tuple[int, ...]]) -> None:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for i, shape in enumerate(shapes):
        x = detector_input(*(shape[0], shape[2], shape[3]), seed=i)
        expected = session.run(None, {"input": x})
        got = backend.run(x)
        assert [g.shape for g in got] == [e.shape for e in expected]  # ONNX output order, not the engine's
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)


def test_fake_tensorrt_10_named_tensors_and_cache(
    fake_runtime: Any, detector_onnx: bytes, cache_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trt, cuda = fake_runtime("10.3.0")
    caplog.set_level(logging.INFO, logger="models.backends.tensorrt_backend")
    with create_backend("tensorrt", detector_onnx, label="det", profile=PROFILE) as first:
        assert not first.cache_hit
        assert first.engine_path.is_file()
        assert isinstance(first._io, trt_backend._NamedTensorIO)
        assert first.output_names == ("loc", "conf", "landmarks")
        _check_against_ort(first, detector_onnx, [(1, 3, 32, 32), (4, 3, 96, 128), (3, 3, 64, 96), (1, 3, 64, 64)])
        # only the used bytes travel: a 1x3x32x32 batch copies 12 KiB, not the max-shape buffer
        cuda.copied.clear()
        first.run(detector_input(1, 32, 32))
        assert cuda.copied[0] == 1 * 3 * 32 * 32 * 4
        with pytest.raises(BackendError, match="outside the engine profile"):
            first.run(detector_input(5, 32, 32))
        with pytest.raises(BackendError, match="outside"):
            first.run(np.zeros((3, 32, 32), np.float32))
    (build,) = trt.builds
    assert build["flags"] == 0  # no EXPLICIT_BATCH on 10.x, weakly typed before 10.12
    assert trt.BuilderFlag.FP16 in build["config"].flags
    assert build["config"].profiles[0].shapes == ("input", PROFILE.min_shape, PROFILE.opt_shape, PROFILE.max_shape)
    assert build["config"].progress_monitor is not None
    assert cuda.depth == 0 and cuda.detached and not cuda.memory  # contexts balanced, buffers freed
    with pytest.raises(BackendError, match="closed"):
        first.run(detector_input(1, 32, 32))

    # second construction: loaded from the cache, nothing built
    with create_backend("tensorrt", detector_onnx, label="det", profile=PROFILE) as second:
        assert second.cache_hit
        assert second.engine_path == first.engine_path
    assert len(trt.builds) == 1
    assert any("loaded TensorRT engine from cache" in r.getMessage() for r in caplog.records)

    # a corrupt cached engine is rebuilt (and logged), not a crash
    first.engine_path.write_bytes(b"garbage")
    with create_backend("tensorrt", detector_onnx, label="det", profile=PROFILE) as third:
        assert not third.cache_hit
        _check_against_ort(third, detector_onnx, [(2, 3, 64, 64)])
    assert len(trt.builds) == 2
    assert any("corrupt or incompatible" in r.getMessage() for r in caplog.records)
    assert first.engine_path.read_bytes().startswith(b"FAKEPLAN")


def test_fake_tensorrt_8_bindings(fake_runtime: Any, detector_onnx: bytes, cache_root: Path) -> None:
    trt, cuda = fake_runtime("8.2.1.8")
    with create_backend("tensorrt", detector_onnx, label="det", profile=PROFILE) as backend:
        assert isinstance(backend._io, trt_backend._BindingIO)
        assert backend.engine_path.is_relative_to(cache_root)
        _check_against_ort(backend, detector_onnx, [(1, 3, 32, 32), (4, 3, 96, 128)])
    (build,) = trt.builds
    assert build["flags"] == 1 << trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    assert trt.BuilderFlag.FP16 in build["config"].flags
    assert cuda.depth == 0 and not cuda.memory


@pytest.mark.parametrize("version", ["10.12.0.36", "11.0.0"])
def test_fake_tensorrt_strongly_typed(fake_runtime: Any, detector_onnx: bytes, tmp_path: Path, version: str) -> None:
    trt, _ = fake_runtime(version)
    profile = ShapeProfile((1, 3, 32, 32), (1, 3, 64, 64), (2, 3, 64, 64))
    backend = trt_backend.TensorRTBackend(detector_onnx, label="det", profile=profile, cache=tmp_path)
    with backend:
        got = backend.run(detector_input(2, 64, 64))
        ref = ort.InferenceSession(detector_onnx, providers=["CPUExecutionProvider"]).run(
            None, {"input": detector_input(2, 64, 64)}
        )
        for g, r in zip(got, ref, strict=True):
            assert np.abs(g - r).max() <= 0.02 * max(1.0, np.abs(r).max())
    (build,) = trt.builds
    assert build["flags"] == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert not hasattr(trt.BuilderFlag, "FP16") or trt.BuilderFlag.FP16 not in build["config"].flags
    # precision came from the graph: TensorRT was handed float16 weights
    assert {t.data_type for t in build["model"].graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}


def test_fake_tensorrt_fp32_clears_tf32(fake_runtime: Any, detector_onnx: bytes, tmp_path: Path) -> None:
    trt, _ = fake_runtime("10.3.0")
    trt_backend.TensorRTBackend(detector_onnx, label="det", profile=PROFILE, precision="fp32", cache=tmp_path).close()
    (build,) = trt.builds
    assert build["config"].flags == set()  # neither FP16 nor TF32


def test_fake_tensorrt_bad_precision(fake_runtime: Any, detector_onnx: bytes, tmp_path: Path) -> None:
    fake_runtime("10.3.0")
    with pytest.raises(ConfigError, match="bf16"):
        trt_backend.TensorRTBackend(detector_onnx, label="det", profile=PROFILE, precision="bf16", cache=tmp_path)
