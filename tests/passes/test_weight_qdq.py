"""WeightQDQPass alone on the tiny graph (tinygraph.py), no torch: one behaviour per test."""

import numpy as np
import onnx_ir as ir
import pytest

import passes._packing as packing
from cora_onnx.core.plan import LayerPlan, Plan, WeightFingerprint
from passes import WeightQDQPass
from tinygraph import plan_error

LAYERS = (("conv1", "conv"), ("pw", "conv"), ("fc", "linear"))


def _plan(graph, bits, symmetric=True, per_channel=True, names=("conv1", "pw", "fc")):
    return Plan("rtn", {}, tuple(LayerPlan(name, kind, graph.SHAPES[f"{name}.weight"],
                                           uniform=graph.uniform(graph.weights[f"{name}.weight"], bits, symmetric,
                                                                 per_channel))
                                 for name, kind in LAYERS if name in names))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric,per_channel", [(True, True), (False, True), (True, False), (False, False)])
def test_each_planned_weight_becomes_a_dequantized_grid(graph, bits, symmetric, per_channel):
    """Each planned weight becomes DequantizeLinear(<w>_quantized in the container of its width)
    feeding the same input of the same node, and ONNX Runtime computes what the float graph
    computes with the plan's weights."""
    plan = _plan(graph, bits, symmetric, per_channel)
    model = graph.model()
    result = WeightQDQPass(plan)(model)
    assert result.modified and result.model is model
    assert graph.ops(model).count("DequantizeLinear") == 3 and graph.ops(model).count("Conv") == 2
    container = {(True, True): ir.DataType.INT4, (False, True): ir.DataType.UINT4,
                 (True, False): ir.DataType.INT8, (False, False): ir.DataType.UINT8}[symmetric, bits <= 4]
    users = graph.nodes(model)
    for lp in plan.layers:
        assert lp.weight not in model.graph.initializers  # the float weight is gone
        q = model.graph.initializers[f"{lp.weight}_quantized"]
        nbytes = (lp.uniform.q.size + 1) // 2 if bits <= 4 else lp.uniform.q.size  # 4-bit grids packed 2 per byte
        assert q.dtype == container and q.const_value.nbytes == nbytes
        dq = users[f"{lp.weight}_DequantizeLinear"]
        assert [v.name for v in dq.inputs] == [f"{lp.weight}_quantized", f"{lp.weight}_scale", f"{lp.weight}_zero_point"]
        assert (dq.attributes.get_int("axis") if "axis" in dq.attributes else None) == (0 if per_channel else None)
        assert model.graph.initializers[f"{lp.weight}_zero_point"].dtype == container
        assert users[lp.name].inputs[1] is dq.outputs[0]
        assert dq.metadata_props["cora_onnx.pass"] == "WeightQDQPass"
    want = graph.run(graph.proto(**{f"{lp.name}__weight": lp.uniform.dequantize() for lp in plan.layers}))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-5, atol=1e-5)
    if bits == 2:  # and the plan really changed the function
        assert np.abs(want - graph.run(graph.proto())).max() > 1e-2


def test_an_unplanned_graph_is_left_alone(graph):
    model = graph.model()
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not WeightQDQPass(Plan("rtn", {}, ()))(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_excluded_layers_keep_their_float_weight(graph):
    """exclude: layers whose grid another pass writes (the merged layouts) are not touched."""
    model = graph.model()
    WeightQDQPass(_plan(graph, 4), exclude={"pw"})(model)
    assert "pw.weight" in model.graph.initializers and "pw.weight_quantized" not in model.graph.initializers
    assert graph.nodes(model)["pw"].inputs[1] is model.graph.initializers["pw.weight"]
    assert "conv1.weight_quantized" in model.graph.initializers


def test_sub_4_bit_grids_need_opset_21(graph):
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21"):
        WeightQDQPass(_plan(graph, 4))(graph.model(opset=18))


def test_8_bit_grids_need_only_opset_13(graph):
    model = graph.model(opset=18)
    assert WeightQDQPass(_plan(graph, 8))(model).modified
    np.testing.assert_allclose(graph.run(model), graph.run(graph.proto(opset=18, **{
        f"{lp.name}__weight": lp.uniform.dequantize() for lp in _plan(graph, 8).layers})), rtol=1e-5, atol=1e-5)


def test_a_weight_the_graph_does_not_have_is_refused(graph):
    w = graph.weights["pw.weight"]
    plan = Plan("rtn", {}, (LayerPlan("other", "conv", w.shape, uniform=graph.uniform(w, 4)),))
    err = plan_error(lambda: WeightQDQPass(plan)(graph.model()))
    assert "no initializer named other.weight" in str(err)


def test_a_rewritten_weight_is_refused(graph):
    """The initializer under the planned name is not the weight the plan was made from (scaled by
    1.1, as a BatchNorm fused by an exporter would): the pass refuses to replace it."""
    w = graph.weights["conv1.weight"]
    plan = Plan("rtn", {}, (LayerPlan("conv1", "conv", w.shape, uniform=graph.uniform(w, 4),
                                      fingerprint=WeightFingerprint.of(w)),))
    assert WeightQDQPass(plan)(graph.model()).modified  # the planned weight: accepted
    err = plan_error(lambda: WeightQDQPass(plan)(graph.model(conv1__weight=w * np.float32(1.1))))
    assert "not the float weight the plan was made from" in str(err)


@pytest.mark.parametrize("bits", [2, 3])
def test_2_and_3_bit_grids_are_packed_in_bytes(graph, bits, monkeypatch):
    """A grid big enough (here: every grid) is stored as bytes, 4 (2 bits) or 8/3 (3 bits) values a
    byte, behind a decoding subgraph; ONNX Runtime decodes it exactly, as written and optimized."""
    monkeypatch.setattr(packing, "MIN_SAVING", -(1 << 20))
    plan = _plan(graph, bits, names=("conv1",))
    model = graph.model()
    WeightQDQPass(plan)(model)
    packed = model.graph.initializers["conv1.weight_quantized_packed"]
    k, g = packing.PACKED_BITS[bits]
    assert packed.dtype == ir.DataType.UINT8 and packed.const_value.nbytes == -(-216 // k) * g
    assert "conv1.weight_quantized" not in model.graph.initializers
    assert model.graph.initializers["conv1.weight_zero_point"].dtype == ir.DataType.INT8
    want = graph.run(graph.proto(conv1__weight=plan.layers[0].uniform.dequantize()))
    for optimize in (False, True):
        np.testing.assert_allclose(graph.run(model, optimize=optimize), want, rtol=1e-5, atol=1e-5)


def test_group_wise_scales_become_a_blocked_dequantize(graph):
    """One float16 scale per 8 weights of a channel: a 2-D grid, the scales Cast to float, a
    DequantizeLinear(axis 1, block_size 8) and a Reshape to the weight's shape."""
    w = graph.weights["conv1.weight"]  # 27 weights a channel: groups of 8, 8, 8, 3
    u = graph.grouped(w, 4, 8)
    model = graph.model()
    WeightQDQPass(Plan("rtn", {}, (LayerPlan("conv1", "conv", w.shape, uniform=u),)))(model)
    nodes = graph.nodes(model)
    dq = nodes["conv1.weight_DequantizeLinear"]
    assert dq.attributes.get_int("axis") == 1 and dq.attributes.get_int("block_size") == 8
    assert model.graph.initializers["conv1.weight_scale"].dtype == ir.DataType.FLOAT16
    assert model.graph.initializers["conv1.weight_quantized"].shape == ir.Shape([8, 27])
    assert nodes["conv1"].inputs[1] is nodes["conv1.weight_Reshape"].outputs[0]
    np.testing.assert_allclose(graph.run(model), graph.run(graph.proto(conv1__weight=u.dequantize())),
                               rtol=1e-5, atol=1e-5)
