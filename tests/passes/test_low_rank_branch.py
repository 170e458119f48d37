"""LowRankBranchPass alone on the tiny graph (tinygraph.py), no torch: one behaviour per test."""

import numpy as np
import onnx_ir as ir
import pytest

from cora_onnx.core.plan import LayerPlan, Plan, WeightFingerprint
from passes import LowRankBranchPass
from lowrank_adapters import random_adapter
from tinygraph import depthwise_model, plan_error


def _adapter(shape, rank, bits):
    return random_adapter(shape, rank, bits, scale=1.0, seed=0)


@pytest.mark.parametrize("bits", [None, 8])
def test_a_branch_is_added_beside_the_conv(graph, bits):
    """LowRankBranchPass alone on a tiny onnx.helper graph: beside the 3x3 Conv (pads 1), Conv(A)
    with the same kernel and pads, Conv(B) 1x1, and an Add that now feeds the Conv's consumer; ONNX
    Runtime computes what the float graph computes with the weight W + B A (convolution is linear)."""
    w = graph.weights["conv1.weight"]
    ad = _adapter(w.shape, 2, bits)
    plan = Plan("cora", {}, (LayerPlan("conv1", "conv", w.shape, adapter=ad),))
    model = graph.model()
    assert LowRankBranchPass(plan)(model).modified
    nodes = {n.name: n for n in model.graph}
    a, b, add = nodes["conv1.adapter_a"], nodes["conv1.adapter_b"], nodes["conv1.adapter_add"]
    assert a.inputs[0] is nodes["conv1"].inputs[0] and b.inputs[0] is a.outputs[0]
    assert list(a.attributes["kernel_shape"].value) == [3, 3] and list(a.attributes["pads"].value) == [1, 1, 1, 1]
    assert list(b.attributes["kernel_shape"].value) == [1, 1]
    assert add.inputs[0] is nodes["conv1"].outputs[0] and add.inputs[1] is b.outputs[0]
    assert nodes["relu"].inputs[0] is add.outputs[0]  # the consumer reads the corrected output
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == (2 if bits else 0)
    merged = w + (ad.b.reshape(w.shape[0], 2) @ ad.a.reshape(2, -1)).reshape(w.shape)
    np.testing.assert_allclose(graph.run(model), graph.run(graph.proto(conv1__weight=merged)), rtol=1e-4, atol=1e-4)
    assert np.abs(graph.run(model) - graph.run(graph.proto())).max() > 1e-2  # the branch changes the output


@pytest.mark.parametrize("bits,dtype", [(8, ir.DataType.INT8), (4, ir.DataType.INT4)])
def test_quantized_factors_are_stored_in_their_container(graph, bits, dtype):
    w = graph.weights["conv1.weight"]
    model = graph.model()
    LowRankBranchPass(Plan("cora", {}, (LayerPlan("conv1", "conv", w.shape, adapter=random_adapter(w.shape, 2, bits)),)))(model)
    for f in ("a", "b"):
        assert model.graph.initializers[f"conv1.adapter_{f}_quantized"].dtype == dtype
        assert graph.nodes(model)[f"conv1.adapter_{f}_DequantizeLinear"].attributes.get_int("axis") == 0


def test_the_branch_nodes_say_what_they_carry(graph):
    w = graph.weights["conv1.weight"]
    model = graph.model()
    LowRankBranchPass(Plan("cora", {}, (LayerPlan("conv1", "conv", w.shape, adapter=_adapter(w.shape, 3, None)),)))(model)
    add = graph.nodes(model)["conv1.adapter_add"]
    assert add.metadata_props["cora_onnx.pass"] == "LowRankBranchPass" and add.metadata_props["cora_onnx.rank"] == "3"
    assert add.metadata_props["cora_onnx.adapter_bytes"] == str(32 * (3 * 27 + 8 * 3) // 8)


def test_a_plan_without_adapters_is_a_no_op(graph):
    assert not LowRankBranchPass(Plan("cora", {}, ()))(graph.model()).modified


def test_a_grouped_conv_is_refused():
    model, w = depthwise_model()
    plan = Plan("cora", {}, (LayerPlan("dw", "conv", w.shape, adapter=_adapter(w.shape, 1, None)),))
    assert "ungrouped Conv" in str(plan_error(lambda: LowRankBranchPass(plan)(model)))


def test_a_rewritten_weight_is_refused(graph):
    w = graph.weights["conv1.weight"]
    plan = Plan("cora", {}, (LayerPlan("conv1", "conv", w.shape, adapter=_adapter(w.shape, 1, None),
                                       fingerprint=WeightFingerprint.of(w)),))
    err = plan_error(lambda: LowRankBranchPass(plan)(graph.model(conv1__weight=w * np.float32(1.1))))
    assert "not the float weight the plan was made from" in str(err)


def test_a_weight_the_graph_does_not_have_is_refused(graph):
    plan = Plan("cora", {}, (LayerPlan("nope", "conv", (8, 3, 3, 3), adapter=_adapter((8, 3, 3, 3), 1, None)),))
    assert "no initializer named nope.weight" in str(plan_error(lambda: LowRankBranchPass(plan)(graph.model())))
