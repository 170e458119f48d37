"""ActivationQDQPass and activation_layout alone on graphs written here (tinygraph.py and
onnx.helper), no torch: one behaviour per test."""

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import passes._packing as packing
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.core.plan import LayerPlan, Plan
from cora_onnx.onnx.int8 import choose_scheme, integer_kernels
from cora_onnx.onnx.pipeline import cleanup_passes
from cora_onnx.onnx.verify import session
from lowrank_adapters import random_adapter
from passes import (ActivationQDQPass, AdapterMergePass, GroupScaleMergePass, QuantScheme, WeightQDQPass,
                    activation_layout)
from tinygraph import plan_error

AVX2 = QuantScheme("uint8", 7, "test")
VNNI = QuantScheme("uint8", 8, "test")


def test_adapter_branch_graph_runs_on_integer_kernels():
    """Shape of the CoRa branches: main Conv + Conv(A, 3x3, r) -> Conv(B, 1x1) -> Add -> Relu,
    INT8 QDQ weights on all three, plus a float-weight Conv that the pass quantizes itself."""
    rng = np.random.default_rng(0)

    def qdq(name, shape, graph_inits, nodes):
        q = rng.integers(-60, 60, size=shape).astype(np.int8)
        graph_inits += [onnx.numpy_helper.from_array(q, f"{name}_q"),
                        onnx.numpy_helper.from_array(np.full(shape[0], 0.01, np.float32), f"{name}_s"),
                        onnx.numpy_helper.from_array(np.zeros(shape[0], np.int8), f"{name}_z")]
        nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], axis=0))

    inits, nodes = [], []
    qdq("w_main", (8, 4, 3, 3), inits, nodes)
    qdq("w_a", (2, 4, 3, 3), inits, nodes)
    qdq("w_b", (8, 2, 1, 1), inits, nodes)
    inits.append(onnx.numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32) * 0.1, "w_float"))
    nodes += [onnx.helper.make_node("Conv", ["x", "w_main"], ["main"], pads=[1, 1, 1, 1]),
              onnx.helper.make_node("Conv", ["x", "w_a"], ["a"], pads=[1, 1, 1, 1]),
              onnx.helper.make_node("Conv", ["a", "w_b"], ["b"]),
              onnx.helper.make_node("Add", ["main", "b"], ["s"]),
              onnx.helper.make_node("Relu", ["s"], ["r"]),
              onnx.helper.make_node("Conv", ["r", "w_float"], ["y"])]
    g = onnx.helper.make_graph(nodes, "adapter", [onnx.helper.make_tensor_value_info("x", 1, ["N", 4, 6, 6])],
                               [onnx.helper.make_tensor_value_info("y", 1, ["N", 8, 6, 6])], inits)
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    layout = activation_layout(model)
    assert sorted(layout.calibrate) == ["a", "b", "main", "r", "x", "y"]  # a Conv output that is a graph output too
    x = rng.normal(size=(16, 4, 6, 6)).astype(np.float32)
    outs = session(proto.SerializeToString(), optimize=False)
    ranges = {}
    for t in layout.calibrate:  # exact ranges from a run with every tensor as output
        m2 = onnx.ModelProto()
        m2.CopyFrom(proto)
        m2.graph.output.append(onnx.helper.make_tensor_value_info(t, 1, None))
        v = session(m2.SerializeToString(), optimize=False).run([t], {"x": x})[0]
        ranges[t] = (float(v.min()), float(v.max()))
    p = ActivationQDQPass(ranges, AVX2)
    assert p(model).modified
    ir.passes.PassManager(cleanup_passes())(model)
    blob = onnx_bytes(model)
    k = integer_kernels(blob)
    assert k["ops"].get("QLinearConv", 0) == 4 and k["ops"].get("QLinearAdd", 0) == 1 and k["float_compute"] == 0
    ref = outs.run(None, {"x": x})[0]
    got = session(blob).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("flags,act,wbits", [
    ({"machine": "x86_64", "avx2": True, "vnni": False}, "uint8", 7),
    ({"machine": "x86_64", "avx2": True, "avx512f": True, "vnni": True}, "uint8", 8),
    ({"machine": "aarch64", "arm_dotprod": True}, "uint8", 8),
])
def test_scheme_per_cpu(flags, act, wbits):
    s = choose_scheme(flags)
    assert (s.act_dtype, s.weight_bits) == (act, wbits) and s.reason
    assert s.to_json()["reduce_range"] == (wbits == 7)


def test_all_zero_weight_channel_keeps_its_bias():
    """A channel whose weights are all 0 (EfficientNet has some) must keep its float bias: its
    tiny weight scale would make the INT32 bias scale underflow."""
    w = np.random.default_rng(0).normal(size=(3, 2, 1, 1)).astype(np.float32)
    w[1] = 0.0
    g = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"])], "z",
                               [onnx.helper.make_tensor_value_info("x", 1, ["N", 2, 2, 2])],
                               [onnx.helper.make_tensor_value_info("y", 1, ["N", 3, 2, 2])],
                               [onnx.numpy_helper.from_array(w, "w"),
                                onnx.numpy_helper.from_array(np.array([0.5, 1.5, -0.5], np.float32), "b")])
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    ActivationQDQPass({"x": (-2.0, 2.0), "y": (-4.0, 4.0)}, AVX2)(model)
    x = np.random.default_rng(1).uniform(-1, 1, size=(4, 2, 2, 2)).astype(np.float32)
    got = session(onnx_bytes(model)).run(None, {"x": x})[0]
    ref = session(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got[:, 1], 1.5, atol=4.0 / 255)
    assert np.abs(got - ref).max() < 0.1


def test_a_channel_of_near_zero_weights_gets_a_scale_its_bias_fits():
    """A channel with weights ~1e-9 and a real bias (a BatchNorm channel folded with gamma ~ 0, as
    EfficientNet-Lite0's stem has): at input x weight scale its bias would not fit INT32, and a
    clipped bias overflows ONNX Runtime's INT32 sum. Its weight scale is raised until the bias fits
    with room for the products, so the channel outputs its bias, as the float model does."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    w[1] *= 1e-9
    g = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "z",
                               [onnx.helper.make_tensor_value_info("x", 1, ["N", 2, 4, 4])],
                               [onnx.helper.make_tensor_value_info("y", 1, ["N", 3, 4, 4])],
                               [onnx.numpy_helper.from_array(w, "w"),
                                onnx.numpy_helper.from_array(np.array([0.5, -1.5, 0.25], np.float32), "b")])
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    ActivationQDQPass({"x": (-1.0, 1.0), "y": (-4.0, 4.0)}, VNNI)(model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in ir.to_proto(model).graph.initializer}
    (bias,) = [v for k, v in inits.items() if k.endswith("int32_quantized")]
    assert np.abs(bias.astype(np.int64)).max() < 2 ** 31 - 1 - 18 * 255 * 128
    x = rng.uniform(-1, 1, size=(4, 2, 4, 4)).astype(np.float32)
    got = session(onnx_bytes(model)).run(None, {"x": x})[0]
    ref = session(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got[:, 1], -1.5, atol=8.0 / 255)
    assert np.abs(got - np.clip(ref, -4.0, 4.0)).max() < 0.1  # y's range is (-4, 4)


def _float_ranges(graph, names):
    """(min, max) of each named tensor of the float graph on graph.x (ONNX Runtime, extra outputs)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = graph.proto()
    for n in names:
        if n != "input":
            proto.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": graph.x})), input=graph.x)
    return {n: (float(outs[n].min()), float(outs[n].max())) for n in names}


def _quantized(graph, ranges_of=None, scheme=AVX2, model=None):
    """The tiny graph (or `model`) through ActivationQDQPass with the float graph's ranges."""
    model = model if model is not None else graph.model()
    layout = activation_layout(model)
    p = ActivationQDQPass(ranges_of or _float_ranges(graph, layout.calibrate), scheme)
    assert p(model).modified
    return model, p.report


def _weights(graph, bits, names=("conv1", "pw", "fc"), **kw):
    kinds = {"conv1": "conv", "pw": "conv", "fc": "linear"}
    return Plan("rtn", {}, tuple(LayerPlan(n, kinds[n], graph.SHAPES[f"{n}.weight"],
                                           uniform=graph.uniform(graph.weights[f"{n}.weight"], bits, **kw))
                                 for n in names))


def test_the_layout_names_what_is_calibrated_shared_absorbed_and_computed(graph):
    layout = activation_layout(graph.model())
    assert layout.calibrate == ["input", "relu_out", "pw_out", "gap_out"]
    assert layout.shared == {"flat_out": "gap_out", "pool_out": "pw_out"}
    assert layout.absorbed == {"conv1_out": "relu_out"}
    assert layout.compute == ["conv1", "pw", "gap", "fc"]  # the GlobalAveragePool too (QLinearGlobalAveragePool)


def test_every_quantized_tensor_gets_a_quantize_dequantize_pair(graph):
    model, report = _quantized(graph)
    assert report["integer_nodes"] == ["conv1", "pw", "gap", "fc"] and report["float_nodes"] == []
    nodes = graph.nodes(model)
    for t in ("input", "relu_out", "pw_out", "gap_out", "flat_out"):
        q, dq = nodes[f"{t}_QuantizeLinear"], nodes[f"{t}_DequantizeLinear"]
        assert dq.inputs[0] is q.outputs[0] and q.outputs[0].dtype == ir.DataType.UINT8
        assert q.metadata_props["cora_onnx.pass"] == "ActivationQDQPass"
    init = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    assert init["flat_out_scale"] == init["gap_out_scale"] and init["flat_out_zero_point"] == init["gap_out_zero_point"]


def test_a_relu_after_a_conv_is_absorbed_into_its_quantization(graph):
    """The QuantizeLinear of conv1's output takes the Relu's range (lower bound 0), whose clamp is
    the Relu: the Relu node is gone."""
    model, _ = _quantized(graph)
    nodes = graph.nodes(model)
    assert "relu" not in nodes and graph.ops(model).count("Relu") == 0
    absorbed = nodes["relu_out_QuantizeLinear"]
    assert absorbed.inputs[0] is nodes["conv1"].outputs[0] and absorbed.metadata_props["cora_onnx.absorbed"] == "Relu"
    assert model.graph.initializers["relu_out_zero_point"].const_value.numpy() == 0
    assert nodes["pw"].inputs[0].name == "relu_out_dequantized"


def test_float_weights_become_int8_and_biases_int32_at_input_times_weight_scale(graph):
    model, _ = _quantized(graph)
    nodes = graph.nodes(model)
    init = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    for layer in ("conv1", "pw", "fc"):
        wq = init[f"{layer}.weight_quantized"]
        assert wq.dtype == np.int8 and -64 <= wq.min() and wq.max() <= 63  # 7-bit values in an INT8 container
        x_scale = init[f"{nodes[layer].inputs[0].name.removesuffix('_dequantized')}_scale"]
        np.testing.assert_allclose(init[f"{layer}.bias_int32_scale"], x_scale * init[f"{layer}.weight_scale"], rtol=1e-6)
        assert init[f"{layer}.bias_int32_quantized"].dtype == np.int32


def test_onnx_runtime_runs_every_compute_node_as_an_integer_kernel(graph):
    model, _ = _quantized(graph)
    k = integer_kernels(ir.serde.serialize_model(model).SerializeToString())
    assert k["ops"].get("QLinearConv", 0) == 2 and k["ops"].get("QGemm", 0) == 1 and k["float_compute"] == 0
    written, fused, flt = graph.run(model), graph.run(model, optimize=True), graph.run(graph.proto())
    scale = np.abs(flt).max()
    assert np.abs(fused - written).max() <= 1e-3 * scale  # the integer kernels compute what the QDQ graph says
    assert 1e-4 * scale < np.abs(written - flt).max() <= 0.05 * scale  # quantized, and close to float


def test_an_int4_grid_is_cast_to_int8_for_the_integer_kernel(graph):
    """The file keeps the packed 4-bit grid; a Cast to INT8 (folded at load) feeds the kernel."""
    model = graph.model()
    WeightQDQPass(_weights(graph, 4))(model)
    model, report = _quantized(graph, model=model)
    assert report["integer_nodes"] == ["conv1", "pw", "gap", "fc"]
    for layer in ("conv1", "pw", "fc"):
        cast = graph.nodes(model)[f"{layer}.weight_quantized_Cast_int8"]
        assert cast.inputs[0].dtype == ir.DataType.INT4 and cast.outputs[0].dtype == ir.DataType.INT8
        assert model.graph.initializers[f"{layer}.weight_quantized_int8_zero_point"].dtype == ir.DataType.INT8
    k = integer_kernels(onnx_bytes(model))
    assert k["ops"].get("QLinearConv", 0) == 2 and k["ops"].get("QGemm", 0) == 1 and k["float_compute"] == 0


def test_a_packed_grid_is_an_integer_weight(graph, monkeypatch):
    """A 3-bit grid packed in bytes (recognised by its decoding subgraph) feeds an integer kernel."""
    monkeypatch.setattr(packing, "MIN_SAVING", -(1 << 20))
    model = graph.model()
    WeightQDQPass(_weights(graph, 3, names=("conv1",)))(model)
    assert "conv1.weight_quantized_packed" in model.graph.initializers
    model, report = _quantized(graph, model=model)
    assert "conv1" in report["integer_nodes"] and not report["float_nodes"]
    assert integer_kernels(onnx_bytes(model))["float_compute"] == 0


def test_8_bit_grids_stay_float_where_the_cpu_needs_7_bits(graph, caplog):
    model = graph.model()
    WeightQDQPass(_weights(graph, 8))(model)
    ranges = {t: (-1.0, 1.0) for t in activation_layout(model).calibrate}
    with caplog.at_level(logging.WARNING, logger="passes"):
        p = ActivationQDQPass(ranges, AVX2)
        p(model)
    assert p.report["float_nodes"] == ["conv1", "pw", "fc"] and p.report["integer_nodes"] == ["gap"]


def test_8_bit_grids_are_integer_weights_where_the_cpu_takes_8_bits(graph):
    model = graph.model()
    WeightQDQPass(_weights(graph, 8))(model)
    _, report = _quantized(graph, model=model, scheme=VNNI)
    assert report["integer_nodes"] == ["conv1", "pw", "gap", "fc"] and not report["float_nodes"]


def test_weights_requantized_at_load_are_integer_weights(graph):
    """AdapterMergePass's DequantizeLinear(QuantizeLinear(expression)), recognised by its structure."""
    w = graph.weights["conv1.weight"]
    layer = LayerPlan("conv1", "conv", w.shape, uniform=graph.uniform(w, 4), adapter=random_adapter(w.shape, 2, 7))
    model = graph.model()
    AdapterMergePass(Plan("cora", {}, (layer,)), 7)(model)
    model, report = _quantized(graph, model=model)
    assert report["integer_nodes"] == ["conv1", "pw", "gap", "fc"]
    ir.passes.PassManager(cleanup_passes())(model)
    k = integer_kernels(onnx_bytes(model))
    assert k["ops"].get("QLinearConv", 0) == 2 and k["float_compute"] == 0


def test_a_merged_width_above_the_cpu_s_stays_float(graph):
    w = graph.weights["conv1.weight"]
    layer = LayerPlan("conv1", "conv", w.shape, uniform=graph.uniform(w, 4), adapter=random_adapter(w.shape, 2, 7))
    model = graph.model()
    AdapterMergePass(Plan("cora", {}, (layer,)), 8)(model)
    ranges = _float_ranges(graph, activation_layout(model).calibrate)
    p = ActivationQDQPass(ranges, AVX2, merged_bits=8)
    p(model)
    assert p.report["float_nodes"] == ["conv1"]


def test_group_wise_scales_left_blocked_keep_their_node_float(graph):
    """Integer kernels take one weight scale per output channel: a blocked DequantizeLinear (group
    scales not merged by GroupScaleMergePass) leaves its node float; merged, it is integer."""
    w = graph.weights["conv1.weight"]
    plan = Plan("cora", {}, (LayerPlan("conv1", "conv", w.shape, uniform=graph.grouped(w, 4, 8)),))
    blocked = graph.model()
    WeightQDQPass(plan)(blocked)
    _, report = _quantized(graph, model=blocked)
    assert "conv1" in report["float_nodes"]
    merged = graph.model()
    GroupScaleMergePass(plan, 7)(merged)
    _, report = _quantized(graph, model=merged)
    assert report["integer_nodes"] == ["conv1", "pw", "gap", "fc"]


def test_a_tensor_without_a_calibrated_range_is_refused(graph):
    err = plan_error(lambda: ActivationQDQPass({"input": (0.0, 1.0)}, AVX2)(graph.model()))
    assert "no calibrated range for 3 tensors" in str(err)


def test_a_graph_without_compute_nodes_is_left_alone():
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", 1, [1, 2])],
                               [onnx.helper.make_tensor_value_info("y", 1, [1, 2])])
    m = ir.serde.deserialize_model(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    assert not activation_layout(m).calibrate
    assert not ActivationQDQPass({}, AVX2)(m).modified


def test_it_needs_opset_13(graph):
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 13"):
        ActivationQDQPass({}, AVX2)(graph.model(opset=12))
