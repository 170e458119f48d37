"""Group-wise weight scales (UniformWeights.group), plan and export side: the plan's checks, dequantize
and save/load; WeightQDQPass's blocked DequantizeLinear, decoded by ONNX Runtime exactly as
dequantize() computes; a whole model against apply_plan_torch; GroupScaleMergePass and AdapterMergePass per-channel
re-quantization at load; ActivationQDQPass with and without it; the bytes the file stores."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cora_onnx.core.errors import PlanError
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.onnx.inspection import format_inspection, inspect_model
from cora_onnx.core.npgrid import merged_grid
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import LayerPlan, Plan, UniformWeights
from passes import ActivationQDQPass, GroupScaleMergePass, QuantScheme, WeightQDQPass, activation_layout, packs
from lowrank_adapters import random_adapter


def grouped(w: np.ndarray, bits: int, group: int) -> UniformWeights:
    """A min/max grid with one float16-representable scale per `group` weights of a channel."""
    c = w.shape[0]
    w2 = w.reshape(c, -1)
    k = w2.shape[1]
    ng = -(-k // group)
    qmax = (1 << (bits - 1)) - 1
    peak = np.pad(np.abs(w2), ((0, 0), (0, ng * group - k))).reshape(c, ng, group).max(axis=2)
    s = np.maximum((peak / qmax).astype(np.float16), np.float16(2 ** -14)).astype(np.float32)
    srep = np.repeat(s, group, axis=1)[:, :k]
    q = np.clip(np.round(w2 / srep), -qmax - 1, qmax).astype(np.int8).reshape(w.shape)
    return UniformWeights(bits, True, True, q, s, np.zeros(s.shape, np.int8), group=group)


def _graph(cin: int, cout: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """input [N, cin, 6, 6] -> Conv conv1 (cout, 3x3, pads 1, bias) -> Relu -> GlobalAveragePool ->
    Flatten -> Gemm fc (4 x cout, transB, bias) -> logits, opset 21."""
    rng = np.random.default_rng(seed)
    w = {"conv1.weight": rng.normal(size=(cout, cin, 3, 3)), "conv1.bias": 0.5 * rng.normal(size=cout),
         "fc.weight": rng.normal(size=(4, cout)), "fc.bias": 0.5 * rng.normal(size=4)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1_out"], ["relu_out"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu_out"], ["gap_out"], name="gap"),
             helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"),
             helper.make_node("Gemm", ["flat_out", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def _run(proto: onnx.ModelProto, x: np.ndarray, optimize: bool = False, outputs: tuple[str, ...] = ()) -> list:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in outputs:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def _plan(w: dict[str, np.ndarray], bits: int, conv_group: int, fc_group: int = 3) -> Plan:
    return Plan("rtn", {}, (LayerPlan("conv1", "conv", w["conv1.weight"].shape,
                                      uniform=grouped(w["conv1.weight"], bits, conv_group)),
                            LayerPlan("fc", "linear", w["fc.weight"].shape, uniform=grouped(w["fc.weight"], bits, fc_group))))


# ---- the plan ------------------------------------------------------------------------------------

def test_dequantize_repeats_each_scale_over_its_group():
    w = np.random.default_rng(0).normal(size=(5, 3, 3, 3)).astype(np.float32)
    u = grouped(w, 4, 8)  # K = 27: groups of 8, 8, 8, 3
    assert u.scale.shape == u.zero_point.shape == (5, 4) and u.groups == 4
    got = u.dequantize()
    assert got.shape == w.shape and got.dtype == np.float32
    q2, d2 = u.q.reshape(5, 27).astype(np.float32), got.reshape(5, 27)
    for j in range(27):
        np.testing.assert_array_equal(d2[:, j], q2[:, j] * u.scale[:, j // 8])
    assert np.abs(got - w).max() <= np.repeat(u.scale, 8, axis=1)[:, :27].max() / 2 + 1e-6
    assert u.stored_bits() == 4 * w.size + 16 * 20
    plain = UniformWeights(4, True, True, u.q, np.ones(5, np.float32), np.zeros(5, np.int8))
    assert plain.group == 0 and plain.stored_bits() == 4 * (w.size + 5) + 32 * 5


def test_plan_round_trip_with_group_and_old_plans_without(tmp_path):
    w = np.random.default_rng(1).normal(size=(5, 3, 3, 3)).astype(np.float32)
    plan = Plan("rtn", {}, (LayerPlan("conv1", "conv", w.shape, uniform=grouped(w, 3, 8)),
                            LayerPlan("fc", "linear", (4, 3), uniform=grouped(w[:4, :, 0, 0].copy(), 8, 2))))
    plan.save(tmp_path / "p")
    back = Plan.load(tmp_path / "p")
    for a, b in zip(plan.layers, back.layers):
        assert b.uniform.group == a.uniform.group and isinstance(b.uniform.group, int)
        np.testing.assert_array_equal(b.uniform.dequantize(), a.uniform.dequantize())
    assert json.loads((tmp_path / "p.json").read_text())["layers"][0]["uniform"]["group"] == 8
    # a plan written before the field: no "group" key, loads as group 0
    old = Plan("rtn", {}, (LayerPlan("conv1", "conv", w.shape, uniform=UniformWeights(
        4, True, True, np.zeros(w.shape, np.int8), np.ones(5, np.float32), np.zeros(5, np.int8))),))
    old.save(tmp_path / "old")
    doc = json.loads((tmp_path / "old.json").read_text())
    del doc["layers"][0]["uniform"]["group"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert Plan.load(tmp_path / "old").layers[0].uniform.group == 0


def test_plan_checks_of_groups():
    w = np.random.default_rng(2).normal(size=(5, 3, 3, 3)).astype(np.float32)
    u = grouped(w, 4, 8)
    with pytest.raises(PlanError, match="needs per_channel and symmetric"):
        dataclasses.replace(u, per_channel=False)
    with pytest.raises(PlanError, match="needs per_channel and symmetric"):
        UniformWeights(4, False, True, u.q.astype(np.uint8) & 7, u.scale, np.zeros(u.scale.shape, np.uint8), group=8)
    with pytest.raises(PlanError, match=r"must have shape \(5, 4\)"):
        dataclasses.replace(u, scale=u.scale[:, :3].copy(), zero_point=u.zero_point[:, :3].copy())
    with pytest.raises(PlanError, match=r"must have shape \(5,\), got \(5, 4\)"):
        dataclasses.replace(u, group=0)  # (5, 4) scales without a group
    bad = u.scale.copy()
    bad[1, 2] = np.float32(0.1)  # not a float16 value
    with pytest.raises(PlanError, match="exactly representable in float16.*1 of 20"):
        dataclasses.replace(u, scale=bad)
    with pytest.raises(PlanError, match="zero points of 0"):
        dataclasses.replace(u, zero_point=np.ones(u.scale.shape, np.int8))
    with pytest.raises(PlanError, match="group must be an integer >= 0"):
        dataclasses.replace(u, group=-8)


# ---- WeightQDQPass -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cin,cout,group", [(3, 5, 8), (61, 33, 64),  # K = 27, 549: not divisible
                                             (3, 5, 64), (2, 5, 9)])  # one group longer than K; K = 18 divisible
def test_onnx_runtime_decodes_what_dequantize_computes(bits, cin, cout, group):
    """The blocked DequantizeLinear (INT4, INT8, or a 2-3-bit grid packed in bytes when large enough)
    gives exactly UniformWeights.dequantize(), as written and optimized; the model passes the full
    ONNX checker; the layer's DequantizeLinear is marked per_group with its group size."""
    proto, w = _graph(cin, cout)
    plan = _plan(w, bits, group)
    model = ir.serde.deserialize_model(proto)
    assert WeightQDQPass(plan)(model).modified
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    inits = {t.name: t for t in out.graph.initializer}
    c, k = cout, cin * 9
    packed = packs(bits, c * k)
    assert packed == (bits < 4 and cin == 61)
    if packed:
        assert inits["conv1.weight_quantized_packed"].data_type == TensorProto.UINT8
    else:
        want = TensorProto.INT4 if bits <= 4 else TensorProto.INT8
        assert inits["conv1.weight_quantized"].data_type == want and list(inits["conv1.weight_quantized"].dims) == [c, k]
    scale = inits["conv1.weight_scale"]
    assert scale.data_type == TensorProto.FLOAT16 and list(scale.dims) == [c, -(-k // group)]
    assert "conv1.weight" not in inits and "conv1.weight_zero_point" not in inits
    nodes = {n.name: n for n in out.graph.node}
    dq = nodes["conv1.weight_DequantizeLinear"]
    assert len(dq.input) == 2 and {a.name: helper.get_attribute_value(a) for a in dq.attribute} == \
        {"axis": 1, "block_size": group}
    facts = {p.key: p.value for p in dq.metadata_props}
    assert facts["cora_onnx.granularity"] == "per_group" and facts["cora_onnx.group"] == str(group)
    assert nodes["conv1.weight_Reshape"].output[0] == "conv1.weight_dequantized"
    x = np.random.default_rng(3).normal(size=(2, cin, 6, 6)).astype(np.float32)
    for optimize in (False, True):
        _, wc, wf = _run(out, x, optimize, ("conv1.weight_dequantized", "fc.weight_dequantized"))
        np.testing.assert_array_equal(wc, plan.layer("conv1").uniform.dequantize())
        np.testing.assert_array_equal(wf, plan.layer("fc").uniform.dequantize())
    info = inspect_model(out.SerializeToString())
    assert info["weight_grids"] == {f"{bits}-bit g{group}": 1, f"{bits}-bit g3": 1}
    assert f"weight grids: {bits}-bit g3 x1, {bits}-bit g{group} x1" in format_inspection(info, "m")


def test_grouped_layers_need_opset_21():
    proto, w = _graph(3, 5)
    proto.opset_import[0].version = 18
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21 for group-wise scales"):
        WeightQDQPass(_plan(w, 8, 8))(ir.serde.deserialize_model(proto))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_file_stores_the_grid_and_float16_scales(bits):
    """The layer's initializers take stored_bits() (to the byte: containers and packing groups round
    up), half the scale bytes of float32 scales, and no zero points."""
    proto, w = _graph(61, 33)
    plan = _plan(w, bits, 64)
    model = ir.serde.deserialize_model(proto)
    WeightQDQPass(plan)(model)
    inits = {t.name: t for t in ir.serde.serialize_model(model).graph.initializer}
    u = plan.layer("conv1").uniform
    grid = inits["conv1.weight_quantized_packed" if bits == 3 else "conv1.weight_quantized"]
    scale = inits["conv1.weight_scale"]
    assert len(scale.raw_data) == 2 * u.scale.size == u.scale.nbytes // 2
    stored = len(grid.raw_data) + len(scale.raw_data)
    assert u.stored_bits() / 8 <= stored < u.stored_bits() / 8 + 3
    per_channel = u.bits * (u.q.size + u.q.shape[0]) + 32 * u.q.shape[0]
    assert u.stored_bits() - per_channel == 16 * u.scale.size - (u.bits + 32) * u.q.shape[0]


# ---- whole models --------------------------------------------------------------------------------

def _tiny_plan(fused, bits: int, groups: dict[str, int], adapter: str | None = None) -> Plan:
    layers = []
    for name, mod in fused.named_modules():
        if name in groups:
            wt = mod.weight.detach().numpy().copy()
            kind = "conv" if isinstance(mod, torch.nn.Conv2d) else "linear"
            ad = random_adapter(wt.shape, 2, 7) if name == adapter else None
            layers.append(LayerPlan(name, kind, wt.shape, uniform=grouped(wt, bits, groups[name]), adapter=ad))
    return Plan("rtn", {}, tuple(layers)).with_fingerprints(
        {n: m.weight.detach().numpy() for n, m in fused.named_modules() if n in groups})


GROUPS = {"conv1": 8, "dw": 4, "pw": 3, "fc": 6}  # K = 27, 9, 8, 16


@pytest.mark.parametrize("bits,adapter", [(3, None), (4, None), (4, "conv1")])
def test_whole_model_matches_the_pytorch_simulation(tiny, bits, adapter):
    """Every layer grouped (conv, depthwise, 1x1, Linear), an adapter as branch convolutions or not:
    ONNX Runtime computes what apply_plan_torch computes."""
    fused = fuse_batchnorm(tiny)
    plan = _tiny_plan(fused, bits, GROUPS, adapter=adapter)
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan))
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    x = torch.randn(2, 3, 8, 8)
    want = apply_plan_torch(fused, plan)(x).detach().numpy()
    for optimize in (False, True):
        got = _run(onnx.load_from_string(blob), x.numpy(), optimize)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    ops = [n.op_type for n in onnx.load_from_string(blob).graph.node]
    assert ops.count("DequantizeLinear") == 4 + (2 if adapter else 0) and ops.count("Reshape") >= 4  # + A, B factors


def test_adapter_merge_with_grouped_weights(tiny):
    """merge_bits 7: conv1 (grouped, with adapter) and the grouped layers without adapter are
    re-quantized per channel at load; ONNX Runtime folds the expressions (no Expand, Slice,
    QuantizeLinear, MatMul left) and computes what apply_plan_torch(merge_bits=7) computes."""
    fused = fuse_batchnorm(tiny)
    plan = _tiny_plan(fused, 4, GROUPS, adapter="conv1")
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan, merge_bits=7))
    proto = onnx.load_from_string(blob)
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: t for t in proto.graph.initializer}
    for name in GROUPS:
        assert inits[f"{name}.weight_quantized"].data_type == TensorProto.INT4
        assert inits[f"{name}.weight_scale"].data_type == TensorProto.FLOAT16
        assert f"{name}.weight_DequantizeLinear" not in {n.name for n in proto.graph.node}
    qs = {p.value: n for n in proto.graph.node if n.op_type == "QuantizeLinear"
          for p in n.metadata_props if p.key == "cora_onnx.layer"}
    assert set(qs) == set(GROUPS)
    facts = {name: {p.key: p.value for p in q.metadata_props} for name, q in qs.items()}
    # conv1 (adapter) by AdapterMergePass, the others (group-wise scales alone) by GroupScaleMergePass
    assert facts["conv1"]["cora_onnx.pass"] == "AdapterMergePass" and facts["conv1"]["cora_onnx.rank"] == "2"
    assert all(facts[n]["cora_onnx.pass"] == "GroupScaleMergePass" for n in GROUPS if n != "conv1")
    assert all(f["cora_onnx.bits"] == "7" and f["cora_onnx.from_group"] == str(GROUPS[n]) for n, f in facts.items())
    for name in GROUPS:
        _, scale = merged_grid(plan.layer(name), 7)
        prefix = "adapter_merge" if name == "conv1" else "group_merge"
        np.testing.assert_array_equal(numpy_helper.to_array(inits[f"{name}.{prefix}_scale"]), scale)
    from cora_onnx.onnx.verify import optimized_graph

    opt_ops = {n.op_type for n in optimized_graph(blob).graph.node}
    assert not opt_ops & {"MatMul", "Expand", "Slice", "QuantizeLinear"}  # constant-folded at load
    x = torch.randn(2, 3, 8, 8)
    want = apply_plan_torch(fused, plan, merge_bits=7)(x).detach().numpy()
    for optimize in (False, True):
        np.testing.assert_allclose(_run(proto, x.numpy(), optimize)[0], want, rtol=1e-4, atol=1e-4)


# ---- integer activations ---------------------------------------------------------------------------

def _ranges(proto: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict:
    outs = dict(zip(["logits", *[n for n in names if n != "input"]],
                    _run(proto, x, outputs=tuple(n for n in names if n != "input"))), input=x)
    return {n: (float(outs[n].min()), float(outs[n].max())) for n in names}


def test_integer_activations_with_grouped_weights(caplog):
    """Without re-quantization a grouped weight keeps its node float (warned); after
    GroupScaleMergePass both layers are integer kernels."""
    proto, w = _graph(3, 5)
    plan = _plan(w, 4, 8)
    x = np.random.default_rng(4).normal(size=(2, 3, 6, 6)).astype(np.float32)
    scheme = QuantScheme("uint8", 7)

    plain = ir.serde.deserialize_model(proto)
    WeightQDQPass(plan)(plain)
    ranges = _ranges(ir.serde.serialize_model(plain), activation_layout(plain).calibrate, x)
    p = ActivationQDQPass(ranges, scheme)
    with caplog.at_level(logging.WARNING):
        p(plain)
    assert set(p.report["float_nodes"]) == {"conv1", "fc"} and p.report["integer_nodes"] == ["gap"]  # no weight
    assert "2 nodes (e.g. conv1) have weights with group-wise scales" in caplog.text

    merged = ir.serde.deserialize_model(proto)
    GroupScaleMergePass(plan, 7)(merged)
    layout = activation_layout(merged)
    assert layout.compute == ["conv1", "gap", "fc"]
    p = ActivationQDQPass(_ranges(ir.serde.serialize_model(merged), layout.calibrate, x), scheme)
    p(merged)
    assert p.report["integer_nodes"] == ["conv1", "gap", "fc"] and p.report["float_nodes"] == []
    ir.passes.PassManager([ir.passes.common.RemoveUnusedNodesPass(),
                           ir.passes.common.CheckerPass(full_check=True)])(merged)
    out = ir.serde.serialize_model(merged)
    from cora_onnx.onnx.verify import optimized_graph

    opt_ops = {n.op_type for n in optimized_graph(out.SerializeToString()).graph.node}
    assert "QLinearConv" in opt_ops
    want = _run(proto, x)[0]  # float model: close, not equal (4-bit weights, 8-bit activations)
    got = _run(out, x, optimize=True)[0]
    assert np.abs(got - want).max() < 0.5 * np.abs(want).max()
