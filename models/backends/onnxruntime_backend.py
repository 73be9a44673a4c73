"""ONNX Runtime on the CPU: the default backend everywhere without a GPU, and the reference for the others."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.backends.base import InferenceBackend
from models.errors import BackendError

log = logging.getLogger(__name__)


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, model: bytes | Path, *, threads: int | None = None, label: str = "model") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # The pipeline alternates between two sessions (detector, encoder); idle intra-op threads that spin-wait
        # after a run would steal the cores the other session's threads need (measured: 45 ms vs 20 ms a frame).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._label = label
        try:
            self._session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{label}: ONNX Runtime could not load the model: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._outputs = tuple(o.name for o in self._session.get_outputs())

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        try:
            return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        except Exception as exc:
            raise BackendError(f"{self._label}: ONNX Runtime inference failed on {batch.shape}: {exc}") from exc
