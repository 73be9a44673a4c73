"""The small ONNX graph builder our model converters share (dlib -> ONNX, TFLite -> ONNX).

Names are chosen by the converters, nothing is random and nothing is timestamped, so a conversion's bytes are the
same every time; `finish` checks the graph with ONNX's checker and serialises it deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.errors import ModelError

IR_VERSION = 8  # readable by onnxruntime >= 1.10 and TensorRT >= 8.6
OPSET = 13
# every encoder graph's interface: chips [N, 3, S, S] in, embeddings [N, D] out, N symbolic
INPUT_NAME = "chip"
OUTPUT_NAME = "embedding"
BATCH_DIM = "N"


@dataclass
class GraphBuilder:
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs))
        return output

    def finish(
        self,
        *,
        graph_name: str,
        inputs: list[tuple[str, list[str | int]]],
        outputs: list[tuple[str, list[str | int]]],
        opset: int,
        producer: str,
        version: int,
        what: str,
    ) -> bytes:
        """The float32 model with these inputs and outputs (name, shape), checked and serialised deterministically;
        ModelError naming `what` when ONNX's checker refuses it."""
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name=producer,
            producer_version=str(version),
        )
        model.ir_version = IR_VERSION
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"{what}: the converted ONNX graph is invalid: {exc}") from exc
        return model.SerializeToString(deterministic=True)
