"""AdapterMergePass alone on the tiny graph (tinygraph.py), no torch: one behaviour per test."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import passes._packing as packing
from cora_onnx.core.npgrid import merged_grid
from cora_onnx.core.plan import LayerPlan, Plan, WeightFingerprint
from cora_onnx.onnx.verify import optimized_graph
from lowrank_adapters import random_adapter
from passes import AdapterMergePass, WeightQDQPass
from tinygraph import TinyGraph, depthwise_model, plan_error


def _layer(graph, bits=4, adapter_bits=7, symmetric=True, **kw):
    w = graph.weights["conv1.weight"]
    return LayerPlan("conv1", "conv", w.shape, uniform=kw.pop("uniform", None) or graph.uniform(w, bits, symmetric),
                     adapter=random_adapter(w.shape, 2, adapter_bits), **kw)


def _want(graph, layer, bits=7):
    grid, scale = merged_grid(layer, bits)
    return graph.run(graph.proto(conv1__weight=grid * scale[:, None, None, None]))


@pytest.mark.parametrize("adapter_bits,symmetric", [(7, True), (None, True), (7, False)])
def test_the_float_weight_becomes_the_requantized_sum_of_grid_and_adapter(graph, adapter_bits, symmetric):
    """conv1's float weight is replaced by DequantizeLinear(QuantizeLinear(W_q + B A)) on a 7-bit
    per-channel grid (INT8 container, axis 0); the file keeps the 4-bit grid; ONNX Runtime computes
    what the float graph computes with merged_grid's weight."""
    layer = _layer(graph, adapter_bits=adapter_bits, symmetric=symmetric)
    model = graph.model()
    assert AdapterMergePass(Plan("cora", {}, (layer,)), 7)(model).modified
    nodes = graph.nodes(model)
    q, dq = nodes["conv1.adapter_merge_QuantizeLinear"], nodes["conv1.adapter_merge_DequantizeLinear"]
    assert dq.inputs[0] is q.outputs[0] and nodes["conv1"].inputs[1] is dq.outputs[0]
    assert q.attributes.get_int("axis") == 0 and dq.attributes.get_int("axis") == 0
    assert q.outputs[0].dtype == ir.DataType.INT8
    assert "conv1.weight" not in model.graph.initializers
    assert model.graph.initializers["conv1.weight_quantized"].dtype in (ir.DataType.INT4, ir.DataType.UINT4)
    _, scale = merged_grid(layer, 7)
    np.testing.assert_array_equal(model.graph.initializers["conv1.adapter_merge_scale"].const_value.numpy(), scale)
    np.testing.assert_allclose(graph.run(model), _want(graph, layer), rtol=1e-4, atol=1e-4)


def test_onnx_runtime_folds_the_expression_at_load(graph):
    """Optimized, the session holds one integer weight: no MatMul, Cast or QuantizeLinear left, and
    the same outputs as the graph as written."""
    layer = _layer(graph)
    model = graph.model()
    AdapterMergePass(Plan("cora", {}, (layer,)), 7)(model)
    blob = ir.serde.serialize_model(model).SerializeToString()
    assert not {n.op_type for n in optimized_graph(blob).graph.node} & {"MatMul", "Cast", "QuantizeLinear"}
    np.testing.assert_allclose(graph.run(model, optimize=True), _want(graph, layer), rtol=1e-4, atol=1e-4)


def test_the_quantize_node_says_what_was_merged(graph):
    model = graph.model()
    AdapterMergePass(Plan("cora", {}, (_layer(graph),)), 8)(model)
    q = graph.nodes(model)["conv1.adapter_merge_QuantizeLinear"]
    facts = {k: v for k, v in q.metadata_props.items() if k.startswith("cora_onnx.")}
    assert facts["cora_onnx.pass"] == "AdapterMergePass" and facts["cora_onnx.rank"] == "2"
    assert facts["cora_onnx.bits"] == "8" and facts["cora_onnx.layer"] == "conv1"


def test_a_grid_with_group_wise_scales_is_merged_too(graph):
    w = graph.weights["conv1.weight"]
    layer = _layer(graph, uniform=graph.grouped(w, 4, 8))
    model = graph.model()
    AdapterMergePass(Plan("cora", {}, (layer,)), 7)(model)
    assert model.graph.initializers["conv1.weight_scale"].dtype == ir.DataType.FLOAT16  # the group scales stay
    assert graph.nodes(model)["conv1.adapter_merge_QuantizeLinear"].metadata_props["cora_onnx.from_group"] == "8"
    np.testing.assert_allclose(graph.run(model), _want(graph, layer), rtol=1e-4, atol=1e-4)


def test_a_packed_grid_is_kept_packed_in_the_file(graph, monkeypatch):
    monkeypatch.setattr(packing, "MIN_SAVING", -(1 << 20))
    layer = _layer(graph, bits=3)
    model = graph.model()
    AdapterMergePass(Plan("cora", {}, (layer,)), 7)(model)
    assert model.graph.initializers["conv1.weight_quantized_packed"].dtype == ir.DataType.UINT8
    np.testing.assert_allclose(graph.run(model), _want(graph, layer), rtol=1e-4, atol=1e-4)


def test_a_layer_without_a_grid_is_refused(graph):
    w = graph.weights["conv1.weight"]
    layer = LayerPlan("conv1", "conv", w.shape, adapter=random_adapter(w.shape, 2, 7))
    err = plan_error(lambda: AdapterMergePass(Plan("cora", {}, (layer,)), 7)(graph.model()))
    assert "adapter merging needs a quantized weight" in str(err)


def test_a_rewritten_weight_is_refused(graph):
    w = graph.weights["conv1.weight"]
    layer = _layer(graph, fingerprint=WeightFingerprint.of(w))
    err = plan_error(lambda: AdapterMergePass(Plan("cora", {}, (layer,)), 7)(graph.model(conv1__weight=w * 2)))
    assert "not the float weight the plan was made from" in str(err)


def test_a_grouped_conv_is_refused():
    """Depthwise convolution (group = channels): an adapter spans every input channel, it cannot."""
    model, w = depthwise_model()
    layer = LayerPlan("dw", "conv", w.shape, uniform=TinyGraph.uniform(w, 4), adapter=random_adapter(w.shape, 1, None))
    err = plan_error(lambda: AdapterMergePass(Plan("cora", {}, (layer,)), 7)(model))
    assert "ungrouped Conv" in str(err)


def test_widths_other_than_7_or_8_are_refused():
    with pytest.raises(ValueError, match="7 or 8 bits"):
        AdapterMergePass(Plan("cora", {}, ()), 6)


@pytest.mark.parametrize("adapter_bits,symmetric,group", [(8, True, 0), (None, False, 0), (4, True, 4)])
def test_float_merge_is_the_branch_folded_at_load(graph, adapter_bits, symmetric, group):
    """bits None (float activations): the Conv reads Add(W_q, B A), the grid times its scales (in
    standard ops) plus the adapter; ONNX Runtime folds everything at load into one float weight
    (no branch, no MatMul, no DequantizeLinear left; WeightDecodePass, which the decode layout runs
    after it, finds nothing left to decode there), and the model computes what the branch layout
    computes, to float rounding. Group-wise grids are not re-quantized."""
    from passes import LowRankBranchPass, WeightDecodePass
    from test_weight_decode import _grouped

    w = graph.weights["conv1.weight"]
    uniform = _grouped(w, 4, group) if group else graph.uniform(w, 4, symmetric)
    lp = LayerPlan("conv1", "conv", w.shape, uniform=uniform, adapter=random_adapter(w.shape, 2, adapter_bits))
    plan = Plan("cora", {}, (lp,))
    branch = graph.model()
    LowRankBranchPass(plan)(branch)
    WeightQDQPass(plan)(branch)
    model = graph.model()
    assert AdapterMergePass(plan, None)(model).modified
    nodes = {n.name: n for n in model.graph}
    add = nodes["conv1.adapter_merge_Add"]
    assert nodes["conv1"].inputs[1] is add.outputs[0] and add.metadata_props["cora_onnx.rank"] == "2"
    assert [n.op_type for n in model.graph].count("Conv") == 2  # no branch convolutions
    assert "QuantizeLinear" not in [n.op_type for n in model.graph]
    WeightDecodePass()(model)
    np.testing.assert_allclose(graph.run(model), graph.run(branch), rtol=1e-5, atol=1e-5)
    opt = optimized_graph(ir.serde.serialize_model(model).SerializeToString())
    assert not {n.op_type for n in opt.graph.node} & {"Add", "MatMul", "DequantizeLinear", "Cast", "Mul", "Reshape"}
    np.testing.assert_allclose(graph.run(model, optimize=True), graph.run(branch), rtol=1e-4, atol=1e-4)


def test_a_plan_without_adapters_is_a_no_op(graph):
    model = graph.model()
    before = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model)).SerializeToString()
    assert not AdapterMergePass(Plan("cora", {}, (LayerPlan("pw", "conv", graph.SHAPES["pw.weight"]),)), 7)(model).modified
    assert onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model)).SerializeToString() == before
