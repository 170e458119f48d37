"""IntegerFormsPass and the activation ops with integer kernels, on graphs built here (no torch):
spatial means become GlobalAveragePool and Flatten(axis 1) Reshape, with the same outputs and the
replaced outputs' names; after activation QDQ, ONNX Runtime runs GlobalAveragePool, Sigmoid,
Mul and Concat between quantized convolutions on integer kernels, and no float op is left."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cora_onnx.onnx.int8 import float_ops, integer_kernels
from cora_onnx.onnx.pipeline import cleanup_passes
from cora_onnx.onnx.verify import optimized_graph
from passes import ActivationQDQPass, IntegerFormsPass, QuantScheme, activation_layout

VNNI = QuantScheme("uint8", 8, "test")


def _model(nodes, inits, out_shape, opset=21, x_shape=(2, 4, 5, 5)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(proto)


def _run(proto, x, optimize=False):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)


@pytest.mark.parametrize("axes,keepdims,opset,rewritten", [
    ([2, 3], 1, 21, True), ([-1, -2], 0, 21, True), ([2, 3], 0, 13, True),   # opset 13: axes attribute
    ([1, 2], 1, 21, False), ([3], 1, 21, False)])
def test_spatial_mean_becomes_global_average_pool(axes, keepdims, opset, rewritten):
    if opset >= 18:
        nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="m", keepdims=keepdims)]
        inits = [numpy_helper.from_array(np.array(axes, np.int64), "axes")]
    else:
        nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], name="m", axes=axes, keepdims=keepdims)]
        inits = []
    nodes.append(helper.make_node("Relu", ["mean"], ["y"]))
    proto = _model(nodes, inits, None, opset)
    model = ir.from_proto(proto)
    assert IntegerFormsPass()(model).modified == rewritten
    ops = [n.op_type for n in model.graph]
    if rewritten:
        assert ops == ["GlobalAveragePool"] + ([] if keepdims else ["Reshape"]) + ["Relu"]
        gap = next(iter(model.graph))
        assert gap.outputs[0].name == "mean" and gap.metadata_props["cora_onnx.pass"] == "IntegerFormsPass"
    else:
        assert ops == ["ReduceMean", "Relu"]
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(_run(out, X), _run(proto, X), rtol=1e-6, atol=1e-6)


def test_flatten_axis_1_becomes_reshape():
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="f"), helper.make_node("Relu", ["flat"], ["a"]),
             helper.make_node("Flatten", ["x"], ["y2"], name="f2", axis=2),
             helper.make_node("ReduceSum", ["y2"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["a"], ["t"], keepdims=0), helper.make_node("Add", ["s", "t"], ["y"])]
    proto = _model(nodes, [], None)
    model = ir.from_proto(proto)
    assert IntegerFormsPass()(model).modified
    by_name = {n.name: n for n in model.graph}
    assert by_name["f_Reshape"].op_type == "Reshape" and by_name["f_Reshape"].outputs[0].name == "flat"
    assert by_name["f2"].op_type == "Flatten"  # axis 2 is not a Reshape(0, -1)
    np.testing.assert_allclose(_run(ir.to_proto(model), X), _run(proto, X), rtol=1e-5, atol=1e-5)


def _conv(name, cin, cout, rng, inits):
    inits += [numpy_helper.from_array((rng.normal(size=(cout, cin, 1, 1)) * 0.3).astype(np.float32), f"{name}.weight"),
              numpy_helper.from_array((rng.normal(size=cout) * 0.1).astype(np.float32), f"{name}.bias")]


def test_activation_ops_between_quantized_convs_run_on_integer_kernels():
    """Two convs, a squeeze-excite gate (mean -> Sigmoid -> Mul), a Concat and the classifier
    head (mean, Flatten, Gemm): with IntegerFormsPass then activation QDQ, ONNX Runtime's
    optimized graph has QLinearGlobalAveragePool, QLinearSigmoid, QLinearMul, QLinearConcat and
    no float op after the first QuantizeLinear; outputs stay close to the float graph."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
             numpy_helper.from_array((rng.normal(size=(3, 8)) * 0.3).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc.bias")]
    _conv("c1", 4, 4, rng, inits)
    _conv("c2", 4, 4, rng, inits)
    nodes = [helper.make_node("Conv", ["x", "c1.weight", "c1.bias"], ["h1"], name="c1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("ReduceMean", ["r1", "hw"], ["se"], name="se_mean", keepdims=1),
             helper.make_node("Sigmoid", ["se"], ["gate"], name="sigmoid"),
             helper.make_node("Mul", ["r1", "gate"], ["scaled"], name="mul"),
             helper.make_node("Conv", ["scaled", "c2.weight", "c2.bias"], ["h2"], name="c2"),
             helper.make_node("Concat", ["h2", "scaled"], ["cat"], name="concat", axis=1),
             helper.make_node("ReduceMean", ["cat", "hw"], ["pooled"], name="head_mean", keepdims=1),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    proto = _model(nodes, inits, [2, 3])
    model = ir.from_proto(proto)
    IntegerFormsPass()(model)
    layout = activation_layout(model)
    assert {"se_mean_GlobalAveragePool", "sigmoid", "mul", "concat", "head_mean_GlobalAveragePool"} <= set(layout.compute)
    plain = ir.to_proto(model)
    for t in layout.calibrate:
        plain.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": X})), x=X)
    ActivationQDQPass({t: (float(outs[t].min()), float(outs[t].max())) for t in layout.calibrate}, VNNI)(model)
    ir.passes.PassManager(cleanup_passes())(model)
    blob = ir.to_proto(model).SerializeToString()
    ops = integer_kernels(blob)["ops"]
    for op in ("QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearMul", "QLinearConcat", "QLinearConv", "QGemm"):
        assert ops.get(op, 0) >= 1, (op, ops)
    assert [f for f in float_ops(optimized_graph(blob)) if f["after_first_quantize"]] == []
    ref = _run(proto, X)
    got = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_float_ops_names_what_stays_float():
    """A DequantizeLinear -> ReduceMean -> QuantizeLinear (the mean as the dynamo exporter writes
    it, without IntegerFormsPass) is listed with why."""
    q = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
         numpy_helper.from_array(np.array([2, 3], np.int64), "hw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("ReduceMean", ["xd", "hw"], ["m"], name="the_mean"),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    blob = _model(nodes, q, None).SerializeToString()
    found = float_ops(optimized_graph(blob))
    assert [(f["op"], f["node"], f["after_first_quantize"]) for f in found] == [("ReduceMean", "the_mean", True)]
    assert "GlobalAveragePool" in found[0]["reason"]


def test_untyped_values_stay_untyped():
    """A graph without value_info (what the TorchScript exporter writes) serializes after the
    rewrite: the new values get no type rather than an empty one."""
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="f"), helper.make_node("Relu", ["flat"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = ir.from_proto(proto)
    assert IntegerFormsPass()(model).modified
    out = ir.to_proto(model)  # raised SerdeError when the Reshape's output had an empty type
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Relu"]
    np.testing.assert_allclose(_run(out, X), _run(proto, X))
