"""WeightDecodePass on graphs built here (no torch): constant weight DequantizeLinear nodes become
Cast/Sub/Mul (and Unsqueeze/Expand/Reshape/Slice for blocked scales) that compute the same
weights, ONNX Runtime folds them all at load, and QDQ groups and non-constant inputs are left alone."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cora_onnx.core.plan import LayerPlan, Plan, UniformWeights
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.onnx.verify import optimized_graph
from lowrank_adapters import random_adapter
from passes import LowRankBranchPass, WeightDecodePass, WeightQDQPass
from passes.weight_decode import DECODED_FROM_KEY

# what must not survive ONNX Runtime's load-time optimizer once the weights are decoded
DECODE_OPS = {"DequantizeLinear", "Cast", "Sub", "Mul", "Unsqueeze", "Expand", "Reshape", "Slice", "Gather"}


def _grouped(w: np.ndarray, bits: int, group: int) -> UniformWeights:
    """A symmetric grid with one float16-exact scale per `group` weights of a channel."""
    c = w.shape[0]
    w2 = w.reshape(c, -1)
    k = w2.shape[1]
    nb = -(-k // group)
    lim = (1 << (bits - 1)) - 1
    pad = np.pad(np.abs(w2), ((0, 0), (0, nb * group - k)))
    scale = (pad.reshape(c, nb, group).max(axis=2) / lim).astype(np.float16).astype(np.float32)
    q = np.clip(np.round(w2 / np.repeat(scale, group, axis=1)[:, :k]), -lim - 1, lim).astype(np.int8)
    return UniformWeights(bits, True, True, q.reshape(w.shape), scale, np.zeros(scale.shape, np.int8), group=group)


def _plan(graph, bits: int, symmetric: bool, per_channel: bool, group: int = 0, adapter_bits=None) -> Plan:
    w = graph.weights
    conv1 = _grouped(w["conv1.weight"], bits, group) if group else \
        graph.uniform(w["conv1.weight"], bits, symmetric, per_channel)
    return Plan("rtn", {}, (
        LayerPlan("conv1", "conv", w["conv1.weight"].shape, uniform=conv1,
                  adapter=random_adapter(w["conv1.weight"].shape, 2, adapter_bits) if adapter_bits else None),
        LayerPlan("pw", "conv", w["pw.weight"].shape, uniform=graph.uniform(w["pw.weight"], bits, symmetric, per_channel)),
        LayerPlan("fc", "linear", w["fc.weight"].shape, uniform=graph.uniform(w["fc.weight"], 8, symmetric, per_channel))))


@pytest.mark.parametrize("bits,symmetric,per_channel,group", [
    (4, True, True, 0), (4, False, True, 0), (3, True, False, 0), (8, False, False, 0), (2, True, True, 0),
    (4, True, True, 4),    # conv1: K = 27, 7 blocks of 4, the last one partial
    (4, True, True, 9)])   # K = 27 = 3 blocks of 9
def test_same_weights_in_standard_ops_folded_at_load(graph, bits, symmetric, per_channel, group):
    plan = _plan(graph, bits, symmetric, per_channel, group)
    model = graph.model()
    WeightQDQPass(plan)(model)
    want = graph.run(model)
    assert WeightDecodePass()(model).modified
    ops = graph.ops(model)
    assert "DequantizeLinear" not in ops and ops.count("Cast") >= 3 and ops.count("Mul") == 3
    assert ("Sub" in ops) == (not symmetric)
    assert ("Expand" in ops) == bool(group) and ("Slice" in ops) == (group == 4)
    np.testing.assert_array_equal(graph.run(model), want)  # DequantizeLinear's arithmetic, bit for bit
    inits = {v.name: v for v in model.graph.initializers.values()}
    assert inits["conv1.weight_quantized"].dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4) \
        or bits > 4  # the file keeps the integer grid
    muls = {n.metadata_props.get("cora_onnx.layer"): n for n in model.graph if n.op_type == "Mul"}
    assert set(muls) == {"conv1", "pw", "fc"}
    assert muls["conv1"].metadata_props[DECODED_FROM_KEY] == "WeightQDQPass"
    assert muls["conv1"].metadata_props["cora_onnx.bits"] == str(bits)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    opt = optimized_graph(proto.SerializeToString())
    assert not {n.op_type for n in opt.graph.node} & DECODE_OPS  # folded when the session loads
    np.testing.assert_allclose(graph.run(model, optimize=True), want, rtol=1e-5, atol=1e-5)
    assert not WeightDecodePass()(model).modified  # nothing left to decode


def test_pipeline_decodes_adapters_too(graph):
    """apply_plan(weight_layout="decode"): the weight grids and the quantized CoRa adapter factors
    are all decoded, the adapters merged into their Conv's weight (default) or as branches
    (LowRankBranchPass's DequantizeLinear decoded too); either computes what the qdq layout computes."""
    plan = _plan(graph, 4, True, True, adapter_bits=8)
    qdq = apply_plan(graph.model(), plan, weight_layout="qdq")
    assert graph.ops(qdq).count("DequantizeLinear") == 5 and graph.ops(qdq).count("Conv") == 4
    want = graph.run(qdq)
    for adapters, convs in (("branch", 4), (None, 2)):
        dec = apply_plan(graph.model(), plan, weight_layout="decode", adapter_layout=adapters)
        assert "DequantizeLinear" not in graph.ops(dec) and graph.ops(dec).count("Conv") == convs
        if adapters == "branch":
            np.testing.assert_array_equal(graph.run(dec), want)
        np.testing.assert_allclose(graph.run(dec), want, rtol=1e-5, atol=1e-5)
        opt = optimized_graph(ir.serde.serialize_model(dec).SerializeToString())
        assert not {n.op_type for n in opt.graph.node} & DECODE_OPS
    with pytest.raises(ValueError, match="weight layout"):
        apply_plan(graph.model(), plan, weight_layout="fold")


def _ort(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _qdq_conv(weight_is_input: bool = False) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Conv(DequantizeLinear(w int8)) -> y, and a
    second Conv whose weight DequantizeLinear reads w2 (a graph input when weight_is_input)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 1, 1)).astype(np.int8), "w"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
             numpy_helper.from_array(rng.integers(-127, 128, (2, 4, 1, 1)).astype(np.int8), "w2"),
             numpy_helper.from_array(np.full(2, 0.02, np.float32), "w2_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "w_scale"], ["wd"], name="w_DequantizeLinear", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["h"], name="conv"),
             helper.make_node("DequantizeLinear", ["w2", "w2_scale"], ["w2d"], name="w2_DequantizeLinear", axis=0),
             helper.make_node("Conv", ["h", "w2d"], ["y"], name="conv2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w2", TensorProto.INT8, [2, 4, 1, 1]))
    graph = helper.make_graph(nodes, "qdq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_leaves_qdq_groups_and_inputs_alone():
    """The weight of a QDQ group (its Conv reads a dequantized activation) stays DequantizeLinear,
    for ONNX Runtime's integer fusion; the plain weight DequantizeLinear beside it is decoded; one
    that reads an overridable initializer (also a graph input) is not constant and stays."""
    proto = _qdq_conv()
    x = {"x": np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)}
    model = ir.from_proto(proto)
    assert WeightDecodePass()(model).modified
    names = {n.name: n.op_type for n in model.graph}
    assert names["w_DequantizeLinear"] == "DequantizeLinear" and "w2_DequantizeLinear" not in names
    assert names["w2_Mul"] == "Mul"
    np.testing.assert_array_equal(_ort(ir.to_proto(model), x), _ort(proto, x))

    model = ir.from_proto(_qdq_conv(weight_is_input=True))
    assert not WeightDecodePass()(model).modified


def test_shared_scale_is_reshaped_by_a_node():
    """A per-channel scale read by two DequantizeLinear nodes is not reshaped in place (the other
    reader still needs it 1-D): a Reshape with a shared shape constant lays it out."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.integers(-8, 8, (3, 3, 1, 1)).astype(np.int8), "a"),
             numpy_helper.from_array(rng.integers(-8, 8, (3, 3, 1, 1)).astype(np.int8), "b"),
             numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "s")]
    nodes = [helper.make_node("DequantizeLinear", ["a", "s"], ["ad"], name="a_DequantizeLinear", axis=0),
             helper.make_node("DequantizeLinear", ["b", "s"], ["bd"], name="b_DequantizeLinear", axis=0),
             helper.make_node("Conv", ["x", "ad"], ["h"]), helper.make_node("Conv", ["h", "bd"], ["y"])]
    proto = helper.make_model(helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits), opset_imports=[helper.make_opsetid("", 21)])
    model = ir.from_proto(proto)
    assert WeightDecodePass()(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("Reshape") == 2 and "DequantizeLinear" not in ops
    assert list(model.graph.initializers["s"].shape) == [3]
    x = {"x": rng.normal(size=(1, 3, 2, 2)).astype(np.float32)}
    np.testing.assert_array_equal(_ort(ir.to_proto(model), x), _ort(proto, x))
