import numpy as np
import onnx
import pytest
import torch

from cora_onnx.core.errors import PlanError
from cora_onnx.torch.export import export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import Bias, LayerPlan, LowRankAdapter, Plan
from passes import BiasUpdatePass, LowRankBranchPass


def _adapter(shape, rank, bits):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(rank,) + tuple(shape[1:])).astype(np.float32)
    b = rng.normal(size=(shape[0], rank, 1, 1)).astype(np.float32)
    if bits is None:
        return LowRankAdapter(rank, a, b)
    sa = (np.abs(a).reshape(rank, -1).max(1) / 127).astype(np.float32)
    sb = (np.abs(b).reshape(shape[0], -1).max(1) / 127).astype(np.float32)
    a = (np.round(a / sa[:, None, None, None]) * sa[:, None, None, None]).astype(np.float32)
    b = (np.round(b / sb[:, None, None, None]) * sb[:, None, None, None]).astype(np.float32)
    return LowRankAdapter(rank, a, b, bits=8, a_scale=sa, b_scale=sb)


@pytest.mark.parametrize("bits", [None, 8])
def test_branch_structure(tiny, bits):
    fused = fuse_batchnorm(tiny)
    shape = tuple(fused.pw.weight.shape)
    plan = Plan("cora", {}, (LayerPlan("pw", "conv", shape, adapter=_adapter(shape, 3, bits)),))
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(fused, 8), plan)))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 5 and ops.count("Add") == 1
    assert ops.count("DequantizeLinear") == (2 if bits else 0)
    add = next(n for n in proto.graph.node if n.name == "pw.adapter_add")
    conv_b = next(n for n in proto.graph.node if n.name == "pw.adapter_b")
    assert add.input[1] == conv_b.output[0]
    assert {p.key: p.value for p in add.metadata_props}["cora_onnx.rank"] == "3"
    inits = {t.name: t for t in proto.graph.initializer}
    if bits:
        assert inits["pw.adapter_a_quantized"].data_type == onnx.TensorProto.INT8
    else:
        assert list(inits["pw.adapter_a.weight"].dims) == [3, 8, 1, 1]


def test_no_adapter_is_a_no_op(tiny):
    model = export_onnx(fuse_batchnorm(tiny), 8)
    assert not LowRankBranchPass(Plan("cora", {}, ()))(model).modified


def test_adapter_on_grouped_conv_rejected(tiny):
    fused = fuse_batchnorm(tiny)
    shape = tuple(fused.dw.weight.shape)
    plan = Plan("cora", {}, (LayerPlan("dw", "conv", shape, adapter=_adapter(shape, 1, None)),))
    with pytest.raises(PlanError, match="ungrouped"):
        apply_plan(export_onnx(fused, 8), plan)


def test_bias_update_adds_and_replaces(tiny):
    fused = fuse_batchnorm(tiny)
    new_pw = np.arange(16, dtype=np.float32)
    new_fc = np.ones(5, dtype=np.float32)
    plan = Plan("cora", {}, (LayerPlan("pw", "conv", tuple(fused.pw.weight.shape), bias=Bias(new_pw)),
                             LayerPlan("fc", "linear", tuple(fused.fc.weight.shape), bias=Bias(new_fc))))
    model = export_onnx(fused, 8)
    assert BiasUpdatePass(plan)(model).modified
    inits = {t.name: t for t in onnx.load_from_string(onnx_bytes(model)).graph.initializer}
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["pw.bias"]), new_pw)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["fc.bias"]), new_fc)


def test_bias_added_to_conv_without_bias():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).eval()
    plan = Plan("cora", {}, (LayerPlan("0", "conv", (4, 3, 3, 3), bias=Bias(np.full(4, 0.5, np.float32))),))
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(m, 8), plan)))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert conv.input[2] == "0.bias"


@pytest.mark.parametrize("bits", [None, 8])
def test_the_pass_alone_on_a_graph_built_here(graph, bits):
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
