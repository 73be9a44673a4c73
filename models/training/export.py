"""ONNX graphs for what training produces, built node by node from the weights as ``models.face.dlib_onnx`` builds the
encoder's: fixed node and tensor names, no timestamps, so identical weights give identical bytes and the sha256
(hence the adapter's fingerprint) is a function of the weights alone. No exporter and no torch are involved.

- adapter: ``embedding`` float32 (N, dim) -> ``adapted`` float32 (N, dim): Gemm, or Gemm / Relu / Gemm / Add;
- verifier: ``pair`` float32 (N, 2, dim), the two embeddings of each pair -> ``logit`` (N,) and ``p_same`` (N,).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from models.face.onnx_graph import IR_VERSION, OPSET
from models.training.verifier import CHI2_EPS

if TYPE_CHECKING:
    from onnx import NodeProto, TensorProto

    from models.training.adapter import AdapterWeights
    from models.training.verifier import VerifierWeights

ADAPTER_INPUT = "embedding"
ADAPTER_OUTPUT = "adapted"
VERIFIER_INPUT = "pair"
VERIFIER_OUTPUTS = ("logit", "p_same")
BATCH_DIM = "N"


def _model(name: str, nodes: list[NodeProto], inits: list[TensorProto], inputs: list, outputs: list) -> bytes:
    from onnx import checker, helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="faceattend", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model.SerializeToString()


def _init(name: str, array: np.ndarray) -> TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name=name)


def adapter_onnx(weights: AdapterWeights) -> bytes:
    from onnx import TensorProto, helper

    dim = weights.dim
    nodes, inits = [], []
    x = ADAPTER_INPUT
    if weights.kind == "linear":
        ((w, b),) = weights.layers
        inits += [_init("w", w), _init("b", b)]
        nodes.append(helper.make_node("Gemm", [x, "w", "b"], [ADAPTER_OUTPUT], name="linear", transB=1))
    else:
        (w1, b1), (w2, b2) = weights.layers
        inits += [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)]
        nodes += [
            helper.make_node("Gemm", [x, "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
            helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["residual"], name="fc2", transB=1),
            helper.make_node("Add", [x, "residual"], [ADAPTER_OUTPUT], name="skip"),
        ]
    return _model(
        f"faceattend_adapter_{weights.kind}",
        nodes,
        inits,
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [BATCH_DIM, dim])],
        [helper.make_tensor_value_info(ADAPTER_OUTPUT, TensorProto.FLOAT, [BATCH_DIM, dim])],
    )


def verifier_onnx(weights: VerifierWeights) -> bytes:
    from onnx import TensorProto, helper

    dim = weights.dim
    inits = [
        _init("w", weights.w),
        _init("b", np.asarray(weights.b, dtype=np.float32)),
        _init("eps", np.asarray(CHI2_EPS, dtype=np.float32)),
    ]
    inits.append(helper.make_tensor("first", TensorProto.INT64, [], [0]))
    inits.append(helper.make_tensor("second", TensorProto.INT64, [], [1]))
    nodes = [
        helper.make_node("Gather", [VERIFIER_INPUT, "first"], ["a"], name="take_a", axis=1),
        helper.make_node("Gather", [VERIFIER_INPUT, "second"], ["b_emb"], name="take_b", axis=1),
        helper.make_node("Sub", ["a", "b_emb"], ["diff"], name="diff"),
    ]
    if weights.form == "abs":
        nodes.append(helper.make_node("Abs", ["diff"], ["feature"], name="abs_diff"))
    else:
        nodes += [
            helper.make_node("Mul", ["diff", "diff"], ["sq"], name="square"),
            helper.make_node("Abs", ["a"], ["abs_a"], name="abs_a"),
            helper.make_node("Abs", ["b_emb"], ["abs_b"], name="abs_b"),
            helper.make_node("Add", ["abs_a", "abs_b"], ["den0"], name="den_sum"),
            helper.make_node("Add", ["den0", "eps"], ["den"], name="den_eps"),
            helper.make_node("Div", ["sq", "den"], ["feature"], name="chi2"),
        ]
    nodes += [
        helper.make_node("MatMul", ["feature", "w"], ["weighted"], name="weights"),
        helper.make_node("Add", ["weighted", "b"], [VERIFIER_OUTPUTS[0]], name="bias"),
        helper.make_node("Sigmoid", [VERIFIER_OUTPUTS[0]], [VERIFIER_OUTPUTS[1]], name="sigmoid"),
    ]
    return _model(
        f"faceattend_verifier_{weights.form}",
        nodes,
        inits,
        [helper.make_tensor_value_info(VERIFIER_INPUT, TensorProto.FLOAT, [BATCH_DIM, 2, dim])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM]) for name in VERIFIER_OUTPUTS],
    )
