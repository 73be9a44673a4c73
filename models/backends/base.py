"""The inference-backend seam: one small interface, implemented by ONNX Runtime and TensorRT."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class ShapeProfile:
    """Input shapes a backend must accept (TensorRT optimisation profile; ONNX Runtime ignores it).

    Each shape is the full NCHW input shape.
    """

    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    def key(self) -> str:
        return "-".join("x".join(str(d) for d in s) for s in (self.min_shape, self.opt_shape, self.max_shape))

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min_shape) and all(
            lo <= d <= hi for d, lo, hi in zip(shape, self.min_shape, self.max_shape, strict=True)
        )


class InferenceBackend(ABC):
    """Runs one single-input ONNX model; outputs come back as float32 arrays in the graph's output order."""

    name: str

    @abstractmethod
    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the model on a float32 NCHW batch. Raises BackendError on failure."""

    @property
    @abstractmethod
    def output_names(self) -> tuple[str, ...]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release device resources."""

    def __enter__(self) -> InferenceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
