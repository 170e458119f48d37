"""WeightNamesPass on hand-written graphs (no torch): a Linear exported as MatMul with its weight
transposed under a generated name (as torch.onnx writes a Linear applied to a 4-D, channels-last
tensor inside a ConvNeXt block), a renamed initializer, and a weight that is nowhere."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import LayerPlan, Plan, WeightFingerprint
from cora_onnx.onnx.pipeline import apply_plan
from passes import WeightNamesPass, locate_weight

RNG = np.random.default_rng(0)
W = RNG.normal(size=(6, 4)).astype(np.float32)  # the Linear's weight (out, in)
B = RNG.normal(size=(6,)).astype(np.float32)
X = RNG.normal(size=(2, 3, 3, 4)).astype(np.float32)  # channels last, as in a ConvNeXt block


def _model(weight_name: str = "val_5", weight: np.ndarray = W.T) -> ir.Model:
    nodes = [helper.make_node("MatMul", ["input", weight_name], ["mm"], name="node_MatMul_2"),
             helper.make_node("Add", ["mm", "block.3.bias"], ["logits"], name="node_Add_3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 3, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 3, 6])],
                              [numpy_helper.from_array(np.ascontiguousarray(weight), weight_name),
                               numpy_helper.from_array(B, "block.3.bias")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


def _plan(uniform=None) -> Plan:
    return Plan("rtn", {}, (LayerPlan("block.3", "linear", W.shape, uniform=uniform,
                                      fingerprint=WeightFingerprint.of(W)),))


def _run(model: ir.Model) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    blob = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


def test_transposed_matmul_weight_gets_its_module_name():
    model = _model()
    before = _run(model)
    found = locate_weight(model.graph, "block.3.weight", WeightFingerprint.of(W))
    assert found is not None and found[0].name == "val_5" and found[1]
    result = WeightNamesPass(_plan())(model)
    assert result.modified
    graph = result.model.graph
    assert "val_5" not in graph.initializers
    np.testing.assert_array_equal(graph.initializers["block.3.weight"].const_value.numpy(), W)
    ops = [n.op_type for n in graph]
    assert ops == ["Transpose", "MatMul", "Add"]
    np.testing.assert_array_equal(_run(result.model), before)


def test_transposed_weight_is_quantized_by_the_plan(graph):
    uniform = graph.uniform(W, 4)
    model = apply_plan(_model(), _plan(uniform))
    ops = [n.op_type for n in model.graph]
    assert "DequantizeLinear" in ops and "block.3.weight" not in model.graph.initializers
    expected = X @ uniform.dequantize().T + B
    np.testing.assert_allclose(_run(model), expected, rtol=1e-5, atol=1e-5)


def test_renamed_initializer_is_renamed_back():
    """The weight in the module's own layout under a generated name (a Gemm with transB=1)."""
    nodes = [helper.make_node("Gemm", ["input", "val_9"], ["logits"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
                              [numpy_helper.from_array(W, "val_9")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    found = locate_weight(model.graph, "block.3.weight", WeightFingerprint.of(W))
    assert found is not None and found[0].name == "val_9" and not found[1]
    assert WeightNamesPass(_plan())(model).modified
    assert "block.3.weight" in model.graph.initializers and "val_9" not in model.graph.initializers
    assert next(iter(model.graph)).inputs[1].name == "block.3.weight"


def test_weight_nowhere_is_left_for_the_weight_pass_to_refuse(graph):
    other = (W.T * 2).astype(np.float32)  # the exporter folded something into it: not the planned weight
    model = _model("val_5", other)
    assert locate_weight(model.graph, "block.3.weight", WeightFingerprint.of(W)) is None
    assert not WeightNamesPass(_plan())(model).modified
    with pytest.raises(PlanError, match="no initializer named block.3.weight"):
        apply_plan(_model("val_5", other), _plan(graph.uniform(W, 4)))


def test_gemm_with_transb_is_not_taken_for_a_transposed_weight():
    """A Gemm with transB=1 reads its weight in the (out, in) layout: a square weight's transpose
    there is another matrix, not this layer's."""
    sq = RNG.normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["input", "val_1"], ["logits"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.ascontiguousarray(sq.T), "val_1")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    assert locate_weight(model.graph, "fc.weight", WeightFingerprint.of(sq)) is None
    onnx.checker.check_model(proto)
