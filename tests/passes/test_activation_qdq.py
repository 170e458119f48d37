import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.core.errors import PlanError
from cora_onnx.torch.export import apply_plan_torch, export_program, fuse_batchnorm, onnx_bytes
from cora_onnx.onnx.int8 import add_activation_qdq, choose_scheme, integer_kernels
from cora_onnx.onnx.pipeline import apply_plan, cleanup_passes
from cora_onnx.torch.search import LayerSelection, RtnSettings, search_rtn
from cora_onnx.torch.simulate import ActivationQuantSim
from cora_onnx.onnx.verify import session
from passes import ActivationQDQPass, QuantScheme, activation_layout

AVX2 = QuantScheme("uint8", 7, "test")


def _images(n=48, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageSet(imgs.numpy(), None, tuple(map(str, range(n))), Preprocess(size))


def _int8_tiny(tiny, bits=4, scheme=AVX2):
    fused = fuse_batchnorm(tiny)
    plan = search_rtn(fused, RtnSettings(bits=bits, selection=LayerSelection(keep=())))
    program = export_program(fused, 8)
    model = apply_plan(program.model, plan)
    ranges, qparams, report = add_activation_qdq(model, _images(), scheme)
    ir.passes.PassManager(cleanup_passes())(model)
    sim = ActivationQuantSim(program, apply_plan_torch(fused, plan), qparams, scheme.act_range,
                             shared=set(qparams) - set(ranges))
    return onnx_bytes(model), sim, qparams, report


def test_every_quantized_layer_is_an_integer_kernel(tiny):
    blob, _, _, report = _int8_tiny(tiny)
    k = integer_kernels(blob)
    assert k["ops"].get("QLinearConv", 0) == 3 and k["ops"].get("QGemm", 0) == 1
    assert k["ops"].get("QLinearGlobalAveragePool", 0) == 1  # the spatial mean, as IntegerFormsPass writes it
    assert k["float_compute"] == 0 and k["integer"] == 5 == len(report["integer_nodes"])
    proto = onnx.load_from_string(blob)
    ops = [n.op_type for n in proto.graph.node]
    assert "Relu" not in ops  # the three ReLUs are absorbed into the QuantizeLinear clamp
    inits = {t.name: t for t in proto.graph.initializer}
    casts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Cast"}
    dq_w = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in casts]
    assert len(dq_w) == 4
    for n in dq_w:  # the file keeps the packed 4-bit grid; a Cast to INT8 (folded by ORT at load) feeds the kernel
        cast = casts[n.input[0]]
        assert inits[cast.input[0]].data_type == onnx.TensorProto.INT4
        assert next(a.i for a in cast.attribute if a.name == "to") == onnx.TensorProto.INT8
        assert inits[n.input[2]].data_type == onnx.TensorProto.INT8
        q = onnx.numpy_helper.to_array(inits[cast.input[0]])
        assert q.min() >= -8 and q.max() <= 7
    biases = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT32
              and t.name.endswith("_quantized")]
    assert len(biases) == 4  # conv1 (from BN), dw, pw, fc


def test_ort_matches_pytorch_simulation_within_quantization_steps(tiny):
    blob, sim, qparams, _ = _int8_tiny(tiny)
    x = torch.from_numpy(next(_images(16, seed=1).batches(16)))
    with torch.no_grad():
        ref = sim(x).numpy()
        flt = tiny(x).numpy()
    plain = session(blob, optimize=False).run(None, {"input": x.numpy()})[0]
    fused = session(blob).run(None, {"input": x.numpy()})[0]
    # logit step: the step of the last quantized tensor (the classifier input) times |W| row sums
    w = tiny.fc.weight.detach().abs().sum(1).max().item()
    step = qparams["mean"][0] * w
    assert np.abs(plain - ref).max() <= 1.0 * step
    assert np.abs(fused - ref).max() <= 3.0 * step
    assert np.abs(ref - flt).max() > 0.5 * step  # the simulation is not the float model


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


def test_weights_that_do_not_fit_stay_float(tiny, caplog):
    fused = fuse_batchnorm(tiny)
    plan = search_rtn(fused, RtnSettings(bits=8, selection=LayerSelection(keep=())))
    model = apply_plan(export_program(fused, 8).model, plan)
    layout = activation_layout(model)
    ranges = {t: (-1.0, 1.0) for t in layout.calibrate}
    p = ActivationQDQPass(ranges, AVX2)  # 7-bit weights needed, the plan has 8-bit grids
    with caplog.at_level(logging.WARNING):
        p(model)
    assert len(p.report["float_nodes"]) == 4 and not p.report["integer_nodes"][1:]  # only the Add-free rest
    assert "does not fit" in caplog.text
    p8 = ActivationQDQPass(ranges, QuantScheme("uint8", 8))
    model8 = apply_plan(export_program(fused, 8).model, plan)
    p8(model8)
    assert len(p8.report["integer_nodes"]) == 4 and not p8.report["float_nodes"]


def test_missing_ranges_and_no_compute_nodes(tiny):
    fused = fuse_batchnorm(tiny)
    model = export_program(fused, 8).model
    with pytest.raises(PlanError, match="no calibrated range"):
        ActivationQDQPass({}, AVX2)(model)
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", 1, [1, 2])],
                               [onnx.helper.make_tensor_value_info("y", 1, [1, 2])])
    m = ir.serde.deserialize_model(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    assert not activation_layout(m).calibrate
    assert not ActivationQDQPass({}, AVX2)(m).modified


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


def test_layout_and_the_pass_alone_on_a_graph_built_here(graph):
    """activation_layout and ActivationQDQPass alone on a tiny onnx.helper graph with float weights:
    the layout names the tensors, the Relu is absorbed into conv1's output quantization, MaxPool and
    Flatten share their input's parameters, the GlobalAveragePool is an integer node, float weights become per-channel INT8 (7-bit values) and biases
    INT32 at input x weight scale; ONNX Runtime fuses every compute node into an integer kernel, which
    agrees with the graph as written, and both stay close to the float graph."""
    model = graph.model()
    layout = activation_layout(model)
    assert layout.calibrate == ["input", "relu_out", "pw_out", "gap_out"]
    assert layout.shared == {"flat_out": "gap_out", "pool_out": "pw_out"} and layout.absorbed == {"conv1_out": "relu_out"}
    assert layout.compute == ["conv1", "pw", "gap", "fc"]
    ranges = _float_ranges(graph, layout.calibrate)
    p = ActivationQDQPass(ranges, AVX2)
    assert p(model).modified
    assert p.report["integer_nodes"] == ["conv1", "pw", "gap", "fc"] and p.report["float_nodes"] == []
    nodes = {n.name: n for n in model.graph}
    assert "relu" not in nodes and [n.op_type for n in model.graph].count("Relu") == 0
    init = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    for t in ("input", "relu_out", "pw_out", "gap_out", "flat_out"):
        q, dq = nodes[f"{t}_QuantizeLinear"], nodes[f"{t}_DequantizeLinear"]
        assert dq.inputs[0] is q.outputs[0] and q.outputs[0].dtype == ir.DataType.UINT8
        assert q.metadata_props["cora_onnx.pass"] == "ActivationQDQPass"
    absorbed = nodes["relu_out_QuantizeLinear"]  # quantizes conv1's output with the Relu's range (lower bound 0)
    assert absorbed.inputs[0] is nodes["conv1"].outputs[0] and absorbed.metadata_props["cora_onnx.absorbed"] == "Relu"
    assert init["relu_out_zero_point"] == 0 and nodes["pw"].inputs[0].name == "relu_out_dequantized"
    assert init["flat_out_scale"] == init["gap_out_scale"] and init["flat_out_zero_point"] == init["gap_out_zero_point"]
    for layer in ("conv1", "pw", "fc"):
        wq = init[f"{layer}.weight_quantized"]
        assert wq.dtype == np.int8 and -64 <= wq.min() and wq.max() <= 63  # 7-bit values in an INT8 container
        bias_scale = init[f"{layer}.bias_int32_scale"]
        x_scale = init[f"{nodes[layer].inputs[0].name.removesuffix('_dequantized')}_scale"]
        np.testing.assert_allclose(bias_scale, x_scale * init[f"{layer}.weight_scale"], rtol=1e-6)
        assert init[f"{layer}.bias_int32_quantized"].dtype == np.int32
    blob = ir.serde.serialize_model(model).SerializeToString()
    k = integer_kernels(blob)
    assert k["ops"].get("QLinearConv", 0) == 2 and k["ops"].get("QGemm", 0) == 1 and k["float_compute"] == 0
    written, fused, flt = graph.run(model), graph.run(model, optimize=True), graph.run(graph.proto())
    scale = np.abs(flt).max()
    assert np.abs(fused - written).max() <= 1e-3 * scale  # the integer kernels compute what the QDQ graph says
    assert 1e-4 * scale < np.abs(written - flt).max() <= 0.05 * scale  # quantized, and close to float
