import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from cora_onnx.core.errors import PlanError
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import Plan
from cora_onnx.torch.search import LayerSelection, RtnSettings, search_rtn
from passes import WeightQDQPass


def _plan(model, bits, **kw):
    return search_rtn(model, RtnSettings(bits=bits, selection=LayerSelection(keep=()), **kw))


def _ort(blob, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("bits,dtype", [(2, onnx.TensorProto.INT4), (4, onnx.TensorProto.INT4),
                                        (6, onnx.TensorProto.INT8)])
def test_structure(tiny, bits, dtype):
    fused = fuse_batchnorm(tiny)
    plan = _plan(fused, bits)
    model = export_onnx(fused, 8)
    result = WeightQDQPass(plan)(model)
    assert result.modified
    own = onnx.load_from_string(onnx_bytes(result.model))  # the pass's own result, before any cleanup
    own_ops = [n.op_type for n in own.graph.node]
    assert own_ops.count("DequantizeLinear") == 4
    for layer in plan.layers:
        dq = next(x for x in own.graph.node if x.output[0] == f"{layer.weight}_dequantized")
        consumer = next(x for x in own.graph.node if x.op_type in ("Conv", "Gemm") and dq.output[0] in x.input)
        assert consumer.input[1] == dq.output[0]  # the layer now reads the dequantized weight
    # and through the whole pipeline (cleanup, topological sort, checker)
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(fused, 8), plan)))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == 4 and ops.count("Conv") == 3 and ops.count("Gemm") == 1
    assert "BatchNormalization" not in ops
    inits = {t.name: t for t in proto.graph.initializer}
    for layer in plan.layers:
        assert layer.weight not in inits  # float weight removed
        q = inits[f"{layer.weight}_quantized"]
        assert q.data_type == dtype
        n = int(np.prod(layer.shape))
        assert len(q.raw_data) == ((n + 1) // 2 if bits <= 4 else n)  # packed: bytes reflect the bit width
        dq = next(x for x in proto.graph.node if x.output[0] == f"{layer.weight}_dequantized")
        assert {a.name: a.i for a in dq.attribute}["axis"] == 0
        assert {p.key: p.value for p in dq.metadata_props}["cora_onnx.pass"] == "WeightQDQPass"
    # every DQ comes before its consumer
    order = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    for i, n in enumerate(proto.graph.node):
        assert all(order.get(inp, -1) < i for inp in n.input)


def test_per_tensor_asymmetric(tiny):
    fused = fuse_batchnorm(tiny)
    plan = _plan(fused, 4, per_channel=False, symmetric=False)
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(fused, 8), plan)))
    zps = [t for t in proto.graph.initializer if t.name.endswith("_zero_point")]
    assert zps and all(t.data_type == onnx.TensorProto.UINT4 and list(t.dims) == [] for t in zps)
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert all(not any(a.name == "axis" for a in n.attribute) for n in dqs)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_numerics_match_torch(tiny, bits, symmetric):
    fused = fuse_batchnorm(tiny)
    plan = _plan(fused, bits, symmetric=symmetric)
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(fused, plan)(x).numpy()
        flt = tiny(x).numpy()
    out = _ort(blob, x.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    if bits <= 3:  # and quantization really changed the function
        assert np.abs(ref - flt).max() > 1e-3


def test_no_uniform_layers_is_a_no_op(tiny):
    fused = fuse_batchnorm(tiny)
    model = export_onnx(fused, 8)
    assert not WeightQDQPass(Plan("rtn", {}, ()))(model).modified


def test_missing_weight_rejected(tiny):
    fused = fuse_batchnorm(tiny)
    plan = _plan(fused, 4)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    other(torch.zeros(1, 3, 8, 8))
    with pytest.raises(PlanError, match="no initializer named"):
        apply_plan(export_onnx(other.eval(), 8), plan)


def test_int4_needs_opset_21(tiny):
    fused = fuse_batchnorm(tiny)
    model = export_onnx(fused, 8, opset=18)
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21"):
        WeightQDQPass(_plan(fused, 4))(model)
    assert WeightQDQPass(_plan(fused, 8))(export_onnx(fused, 8, opset=18)).modified


@pytest.mark.parametrize("component", ["uniform", "codebook", "adapter", "bias"])
def test_weight_keyed_passes_refuse_a_rewritten_weight(tiny, component):
    """The issue-13 defect: the initializer under the planned weight's name is not the weight the
    plan was made from (here scaled by 1.1, as a BatchNorm fused by the exporter would). Each pass
    keyed by weight name refuses; with the right weight it runs."""
    import dataclasses

    from cora_onnx.core.plan import Bias, Codebook, LowRankAdapter
    from passes import BiasUpdatePass, CodebookDecodePass, LowRankBranchPass

    fused = fuse_batchnorm(tiny)
    w = fused.conv1.weight.detach().numpy()
    layer = _plan(fused, 8).layer("conv1")
    extra = {
        "uniform": {},
        "codebook": dict(uniform=None, codebook=Codebook(9, np.zeros((2, 9), np.float16), np.zeros((8, 3), np.uint8))),
        "adapter": dict(adapter=LowRankAdapter(1, np.zeros((1, 3, 3, 3), np.float32), np.zeros((8, 1, 1, 1), np.float32))),
        "bias": dict(bias=Bias(np.zeros(8, np.float32))),
    }[component]
    layer = dataclasses.replace(layer, **extra)
    plan = Plan("rtn", {}, (layer,)).with_fingerprints({"conv1": w})
    make = {"uniform": WeightQDQPass, "codebook": CodebookDecodePass, "adapter": LowRankBranchPass,
            "bias": BiasUpdatePass}[component]
    model = export_onnx(fused, 8)
    init = model.graph.initializers["conv1.weight"]
    init.const_value = ir.Tensor(init.const_value.numpy() * np.float32(1.1), name="conv1.weight")
    with pytest.raises(Exception) as err:
        make(plan)(model)
    cause = err.value
    while not isinstance(cause, PlanError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, PlanError) and "not the float weight the plan was made from" in str(cause)
    assert make(plan)(export_onnx(fused, 8)).modified


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric,per_channel", [(True, True), (False, True), (True, False), (False, False)])
def test_the_pass_alone_on_a_graph_built_here(graph, bits, symmetric, per_channel):
    """WeightQDQPass alone on a tiny onnx.helper graph: each planned weight becomes
    DequantizeLinear(<w>_quantized in the container of its width) feeding the same input of the
    same node, and ONNX Runtime computes what the float graph computes with the plan's weights."""
    from cora_onnx.core.plan import LayerPlan

    layers = tuple(LayerPlan(name, kind, graph.SHAPES[f"{name}.weight"],
                             uniform=graph.uniform(graph.weights[f"{name}.weight"], bits, symmetric, per_channel))
                   for name, kind in (("conv1", "conv"), ("pw", "conv"), ("fc", "linear")))
    model = graph.model()
    result = WeightQDQPass(Plan("rtn", {}, layers))(model)
    assert result.modified and result.model is model
    assert graph.ops(model).count("DequantizeLinear") == 3 and graph.ops(model).count("Conv") == 2
    container = {(True, True): ir.DataType.INT4, (False, True): ir.DataType.UINT4,
                 (True, False): ir.DataType.INT8, (False, False): ir.DataType.UINT8}[symmetric, bits <= 4]
    users = {n.name: n for n in model.graph}
    for lp in layers:
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
    want = graph.run(graph.proto(**{f"{lp.name}__weight": lp.uniform.dequantize() for lp in layers}))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-5, atol=1e-5)
    if bits == 2:  # and the plan really changed the function
        assert np.abs(want - graph.run(graph.proto())).max() > 1e-2


def test_the_pass_alone_leaves_an_unplanned_graph_alone(graph):
    model = graph.model()
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not WeightQDQPass(Plan("rtn", {}, ()))(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before
