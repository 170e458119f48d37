"""GroupScaleMergePass alone on the tiny graph (tinygraph.py), no torch: one behaviour per test."""

import numpy as np
import onnx_ir as ir
import pytest

from cora_onnx.core.npgrid import merged_grid
from cora_onnx.core.plan import LayerPlan, Plan
from cora_onnx.onnx.verify import optimized_graph
from lowrank_adapters import random_adapter
from passes import GroupScaleMergePass


def _layer(graph, name="conv1", kind="conv", group=8):
    w = graph.weights[f"{name}.weight"]
    return LayerPlan(name, kind, w.shape, uniform=graph.grouped(w, 4, group))


def _want(graph, layer, bits=7):
    grid, scale = merged_grid(layer, bits)
    return graph.run(graph.proto(**{f"{layer.name}__weight": grid * scale.reshape((-1,) + (1,) * (grid.ndim - 1))}))


def test_group_scales_become_one_scale_per_channel(graph):
    """The float weight becomes DequantizeLinear(QuantizeLinear(W_q)) on a 7-bit per-channel grid:
    what an integer kernel takes; the file keeps the 4-bit grid and its float16 group scales."""
    layer = _layer(graph)
    model = graph.model()
    assert GroupScaleMergePass(Plan("cora", {}, (layer,)), 7)(model).modified
    nodes = graph.nodes(model)
    q, dq = nodes["conv1.group_merge_QuantizeLinear"], nodes["conv1.group_merge_DequantizeLinear"]
    assert nodes["conv1"].inputs[1] is dq.outputs[0] and dq.inputs[0] is q.outputs[0]
    assert q.attributes.get_int("axis") == 0 and "block_size" not in dq.attributes
    assert model.graph.initializers["conv1.weight_scale"].dtype == ir.DataType.FLOAT16
    assert model.graph.initializers["conv1.weight_quantized"].dtype == ir.DataType.INT4
    assert "conv1.weight" not in model.graph.initializers
    np.testing.assert_allclose(graph.run(model), _want(graph, layer), rtol=1e-4, atol=1e-4)


def test_onnx_runtime_folds_it_at_load(graph):
    model = graph.model()
    layer = _layer(graph)
    GroupScaleMergePass(Plan("cora", {}, (layer,)), 8)(model)
    blob = ir.serde.serialize_model(model).SerializeToString()
    assert not {n.op_type for n in optimized_graph(blob).graph.node} & {"Expand", "Cast", "QuantizeLinear", "Slice"}
    np.testing.assert_allclose(graph.run(model, optimize=True), _want(graph, layer, 8), rtol=1e-4, atol=1e-4)


def test_a_gemm_weight_is_merged_too(graph):
    layer = _layer(graph, "fc", "linear", group=4)  # 6 weights a row: groups of 4 and 2
    model = graph.model()
    GroupScaleMergePass(Plan("cora", {}, (layer,)), 7)(model)
    assert graph.nodes(model)["fc"].inputs[1].name == "fc.group_merge_dequantized"
    np.testing.assert_allclose(graph.run(model), _want(graph, layer), rtol=1e-4, atol=1e-4)


def test_layers_without_groups_or_with_an_adapter_are_not_its_job(graph):
    w = graph.weights["conv1.weight"]
    per_channel = LayerPlan("pw", "conv", graph.SHAPES["pw.weight"], uniform=graph.uniform(graph.weights["pw.weight"], 4))
    adapted = LayerPlan("conv1", "conv", w.shape, uniform=graph.grouped(w, 4, 8), adapter=random_adapter(w.shape, 2, 7))
    p = GroupScaleMergePass(Plan("cora", {}, (per_channel, adapted)), 7)
    assert p.layers == []
    assert not p(graph.model()).modified


def test_it_needs_opset_21(graph):
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21"):
        GroupScaleMergePass(Plan("cora", {}, (_layer(graph),)), 7)(graph.model(opset=18))
