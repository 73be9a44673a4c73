"""Inference backends behind one interface; runtimes are imported only when a backend is created."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.backends.base import BACKENDS, PRECISIONS, InferenceBackend, ShapeProfile
from models.errors import ConfigError

__all__ = ["BACKENDS", "PRECISIONS", "InferenceBackend", "ShapeProfile", "create_backend", "tensorrt_available"]


def create_backend(
    kind: str,
    onnx: bytes | Path,
    *,
    label: str,
    profile: ShapeProfile | None = None,
    precision: str = "fp16",
    threads: int | None = None,
    fp32_layers: Sequence[str] = (),
) -> InferenceBackend:
    """Build the backend named `kind` for one ONNX model.

    `profile` is required by TensorRT (its engine is specialised to a shape range) and ignored by ONNX Runtime;
    so are `precision` (ONNX Runtime on the CPU always computes in fp32), `fp32_layers` (fnmatch patterns on ONNX
    node names or op types that a TensorRT fp16 engine keeps in fp32) and `threads` (TensorRT).
    Raises ConfigError for a bad kind/precision/profile, BackendUnavailableError when the runtime is missing,
    BackendError when the model cannot be loaded or built.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{label}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if kind == "onnxruntime":
        from models.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx, threads=threads, label=label)
    if kind == "tensorrt":
        if profile is None:
            raise ConfigError(f"{label}: the tensorrt backend needs a ShapeProfile (min/opt/max input shapes)")
        from models.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(onnx, label=label, profile=profile, precision=precision, fp32_layers=fp32_layers)
    raise ConfigError(f"{label}: unknown inference backend {kind!r}; valid backends: {', '.join(BACKENDS)}")


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT can run here, and why not (or what it found). Never raises."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        return False, f"tensorrt is not importable: {exc}"
    try:
        import pycuda.driver as cuda
    except Exception as exc:
        return False, f"pycuda is not importable: {exc}"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no CUDA device"
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return True, f"TensorRT {trt.__version__} on {dev.name()} (sm_{major}{minor})"
    except Exception as exc:  # pycuda.driver.Error: no driver, no device, ...
        return False, f"CUDA is not usable: {exc}"
