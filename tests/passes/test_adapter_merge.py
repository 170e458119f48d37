import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from cora_onnx.core.errors import PlanError
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.core.npgrid import merged_grid
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import LayerPlan, Plan
from cora_onnx.torch.search import LayerSelection, RtnSettings, search_rtn
from cora_onnx.onnx.verify import optimized_graph
from passes import AdapterMergePass, WeightQDQPass
from passes.adapter_merge import MERGED_BITS_KEY
from lowrank_adapters import random_adapter


def _plan(fused, bits, adapter_bits, symmetric=True):
    plan = search_rtn(fused, RtnSettings(bits=bits, symmetric=symmetric, selection=LayerSelection(keep=())))
    layers = tuple(dataclasses.replace(lp, adapter=random_adapter(lp.shape, 2, adapter_bits))
                   if lp.name == "conv1" else lp for lp in plan.layers)
    return Plan(plan.method, plan.settings, layers)


@pytest.mark.parametrize("adapter_bits,symmetric", [(7, True), (None, True), (7, False)])
def test_merged_at_load_matches_torch(tiny, adapter_bits, symmetric):
    """The file keeps the INT4 grid and the factors; ONNX Runtime folds the expression into one
    INT8 weight at load, and the model computes what apply_plan_torch(merge_bits=7) computes."""
    fused = fuse_batchnorm(tiny)
    plan = _plan(fused, 4, adapter_bits, symmetric)
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan, merge_bits=7))
    proto = onnx.load_from_string(blob)
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["conv1.weight_quantized"].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    facts = {p.key: p.value for p in q.metadata_props}
    assert facts["cora_onnx.rank"] == "2" and facts["cora_onnx.merged_bits"] == "7"
    opt_ops = {n.op_type for n in optimized_graph(blob).graph.node}
    assert not opt_ops & {"MatMul", "Cast", "QuantizeLinear"}  # constant-folded at load
    x = torch.randn(2, 3, 8, 8)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    want = apply_plan_torch(fused, plan, merge_bits=7)(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_merged_grid_holds_weight_plus_adapter(tiny):
    fused = fuse_batchnorm(tiny)
    lp = next(lp for lp in _plan(fused, 3, 7).layers if lp.adapter is not None)
    q, scale = merged_grid(lp, 7)
    assert q.dtype == np.int8 and np.abs(q).max() == 63 and scale.shape == (lp.shape[0],)
    ad = lp.adapter
    w = lp.uniform.dequantize() + (ad.b.reshape(-1, ad.rank) @ ad.a.reshape(ad.rank, -1)).reshape(lp.shape)
    err = np.abs(q * scale[:, None, None, None] - w)
    assert np.all(err <= scale[:, None, None, None] / 2 + 1e-7)


def test_merge_needs_a_quantized_weight(tiny):
    fused = fuse_batchnorm(tiny)
    plan = _plan(fused, 4, 7)
    no_grid = Plan(plan.method, plan.settings, tuple(dataclasses.replace(lp, uniform=None) if lp.name == "conv1" else lp
                                                     for lp in plan.layers))
    with pytest.raises(PlanError, match="adapter merging needs"):
        apply_plan(export_onnx(fused, 8), no_grid, merge_bits=7)


@pytest.mark.parametrize("adapter_bits,symmetric", [(7, True), (None, False)])
def test_the_pass_alone_on_a_graph_built_here(graph, adapter_bits, symmetric):
    """AdapterMergePass alone, on a tiny onnx.helper graph whose conv1 weight WeightQDQPass made a
    4-bit DequantizeLinear (its precondition): that DequantizeLinear is replaced by
    DequantizeLinear(QuantizeLinear(grid expression)) on a 7-bit per-channel grid, and ONNX Runtime
    (as written, and optimized: the expression folds at load) computes what the float graph
    computes with merged_grid's weight."""
    w = graph.weights["conv1.weight"]
    lp = LayerPlan("conv1", "conv", w.shape, uniform=graph.uniform(w, 4, symmetric),
                   adapter=random_adapter(w.shape, 2, adapter_bits))
    plan = Plan("cora", {}, (lp,))
    model = graph.model()
    WeightQDQPass(plan)(model)
    assert AdapterMergePass(plan, 7)(model).modified
    nodes = {n.name: n for n in model.graph}
    assert "conv1.weight_DequantizeLinear" not in nodes  # the 4-bit DequantizeLinear is gone, its grid stays
    assert model.graph.initializers["conv1.weight_quantized"].dtype in (ir.DataType.INT4, ir.DataType.UINT4)
    q, dq = nodes["conv1.adapter_merge_QuantizeLinear"], nodes["conv1.adapter_merge_DequantizeLinear"]
    assert dq.inputs[0] is q.outputs[0] and nodes["conv1"].inputs[1] is dq.outputs[0]
    assert q.attributes.get_int("axis") == 0 and dq.attributes.get_int("axis") == 0
    assert q.outputs[0].dtype == ir.DataType.INT8
    assert q.metadata_props[MERGED_BITS_KEY] == "7" and q.metadata_props["cora_onnx.rank"] == "2"
    grid, scale = merged_grid(lp, 7)
    np.testing.assert_array_equal(model.graph.initializers["conv1.adapter_merge_scale"].const_value.numpy(), scale)
    want = graph.run(graph.proto(conv1__weight=grid * scale[:, None, None, None]))
    for optimize in (False, True):
        np.testing.assert_allclose(graph.run(model, optimize=optimize), want, rtol=1e-4, atol=1e-4)


def test_the_pass_refuses_bits_other_than_7_or_8():
    with pytest.raises(ValueError, match="7 or 8 bits"):
        AdapterMergePass(Plan("cora", {}, ()), 6)


@pytest.mark.parametrize("adapter_bits,symmetric,group", [(8, True, 0), (None, False, 0), (4, True, 4)])
def test_float_merge_is_the_branch_folded_at_load(graph, adapter_bits, symmetric, group):
    """bits None (float activations): the Conv reads Add(W_q, B A), the weight as WeightQDQPass
    left it plus the adapter; with WeightDecodePass after it, ONNX Runtime folds everything at load
    into one float weight (no branch, no MatMul, no DequantizeLinear left), and the model computes
    what the branch layout computes, to float rounding. Group-wise grids are left to
    WeightDecodePass (not re-quantized)."""
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
    WeightQDQPass(plan)(model)
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
