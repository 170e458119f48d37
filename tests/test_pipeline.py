"""The plan pipeline end to end on torch models: export (torch.onnx) -> apply_plan (every pass,
cleanup, checker) -> ONNX Runtime, against the PyTorch model with the same plan
(cora_onnx.torch.export.apply_plan_torch). Each pass alone, on graphs written in the test, is in
tests/passes (no torch there)."""

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from cora_onnx.core.errors import PlanError
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.core.npgrid import merged_grid
from cora_onnx.core.plan import Bias, Codebook, LayerPlan, LowRankAdapter, Plan
from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.onnx.int8 import add_activation_qdq, integer_kernels
from cora_onnx.onnx.pipeline import apply_plan, cleanup_passes
from cora_onnx.onnx.verify import optimized_graph, session
from cora_onnx.torch.export import apply_plan_torch, export_onnx, export_program, fuse_batchnorm
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.torch.search import LayerSelection, PqSettings, RtnSettings, search_pq, search_rtn
from cora_onnx.torch.simulate import ActivationQuantSim
from lowrank_adapters import random_adapter
from passes import ActivationQDQPass, BiasUpdatePass, CodebookDecodePass, QuantScheme, WeightQDQPass
from passes import _packing as packing
from passes import activation_layout

AVX2 = QuantScheme("uint8", 7, "test")
DECODE_OPS = {"Gather", "Mod", "Div", "MatMul", "Cast", "Slice"}


# ---- weight_qdq ------------------------------------------------------------


def _wqdq_plan(model, bits, **kw):
    return search_rtn(model, RtnSettings(bits=bits, selection=LayerSelection(keep=()), **kw))


def _wqdq_ort(blob, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("bits,dtype", [(2, onnx.TensorProto.INT4), (4, onnx.TensorProto.INT4),
                                        (6, onnx.TensorProto.INT8)])
def test_wqdq_structure(tiny, bits, dtype):
    fused = fuse_batchnorm(tiny)
    plan = _wqdq_plan(fused, bits)
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


def test_wqdq_per_tensor_asymmetric(tiny):
    fused = fuse_batchnorm(tiny)
    plan = _wqdq_plan(fused, 4, per_channel=False, symmetric=False)
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(fused, 8), plan)))
    zps = [t for t in proto.graph.initializer if t.name.endswith("_zero_point")]
    assert zps and all(t.data_type == onnx.TensorProto.UINT4 and list(t.dims) == [] for t in zps)
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert all(not any(a.name == "axis" for a in n.attribute) for n in dqs)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_wqdq_numerics_match_torch(tiny, bits, symmetric):
    fused = fuse_batchnorm(tiny)
    plan = _wqdq_plan(fused, bits, symmetric=symmetric)
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(fused, plan)(x).numpy()
        flt = tiny(x).numpy()
    out = _wqdq_ort(blob, x.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    if bits <= 3:  # and quantization really changed the function
        assert np.abs(ref - flt).max() > 1e-3


def test_wqdq_missing_weight_rejected(tiny):
    fused = fuse_batchnorm(tiny)
    plan = _wqdq_plan(fused, 4)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    other(torch.zeros(1, 3, 8, 8))
    with pytest.raises(PlanError, match="no initializer named"):
        apply_plan(export_onnx(other.eval(), 8), plan)


def test_wqdq_int4_needs_opset_21(tiny):
    fused = fuse_batchnorm(tiny)
    model = export_onnx(fused, 8, opset=18)
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21"):
        WeightQDQPass(_wqdq_plan(fused, 4))(model)
    assert WeightQDQPass(_wqdq_plan(fused, 8))(export_onnx(fused, 8, opset=18)).modified


@pytest.mark.parametrize("component", ["uniform", "codebook", "adapter", "bias"])
def test_wqdq_weight_keyed_passes_refuse_a_rewritten_weight(tiny, component):
    """The issue-13 defect: the initializer under the planned weight's name is not the weight the
    plan was made from (here scaled by 1.1, as a BatchNorm fused by the exporter would). Each pass
    keyed by weight name refuses; with the right weight it runs."""
    import dataclasses

    from cora_onnx.core.plan import Bias, Codebook, LowRankAdapter
    from passes import BiasUpdatePass, CodebookDecodePass, LowRankBranchPass

    fused = fuse_batchnorm(tiny)
    w = fused.conv1.weight.detach().numpy()
    layer = _wqdq_plan(fused, 8).layer("conv1")
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


# ---- adapter_merge ------------------------------------------------------------


def _merge_plan(fused, bits, adapter_bits, symmetric=True):
    plan = search_rtn(fused, RtnSettings(bits=bits, symmetric=symmetric, selection=LayerSelection(keep=())))
    layers = tuple(dataclasses.replace(lp, adapter=random_adapter(lp.shape, 2, adapter_bits))
                   if lp.name == "conv1" else lp for lp in plan.layers)
    return Plan(plan.method, plan.settings, layers)


@pytest.mark.parametrize("adapter_bits,symmetric", [(7, True), (None, True), (7, False)])
def test_merge_merged_at_load_matches_torch(tiny, adapter_bits, symmetric):
    """The file keeps the INT4 grid and the factors; ONNX Runtime folds the expression into one
    INT8 weight at load, and the model computes what apply_plan_torch(merge_bits=7) computes."""
    fused = fuse_batchnorm(tiny)
    plan = _merge_plan(fused, 4, adapter_bits, symmetric)
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan, merge_bits=7))
    proto = onnx.load_from_string(blob)
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["conv1.weight_quantized"].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    facts = {p.key: p.value for p in q.metadata_props}
    assert facts["cora_onnx.rank"] == "2" and facts["cora_onnx.bits"] == "7"
    opt_ops = {n.op_type for n in optimized_graph(blob).graph.node}
    assert not opt_ops & {"MatMul", "Cast", "QuantizeLinear"}  # constant-folded at load
    x = torch.randn(2, 3, 8, 8)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    want = apply_plan_torch(fused, plan, merge_bits=7)(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_merge_merged_grid_holds_weight_plus_adapter(tiny):
    fused = fuse_batchnorm(tiny)
    lp = next(lp for lp in _merge_plan(fused, 3, 7).layers if lp.adapter is not None)
    q, scale = merged_grid(lp, 7)
    assert q.dtype == np.int8 and np.abs(q).max() == 63 and scale.shape == (lp.shape[0],)
    ad = lp.adapter
    w = lp.uniform.dequantize() + (ad.b.reshape(-1, ad.rank) @ ad.a.reshape(ad.rank, -1)).reshape(lp.shape)
    err = np.abs(q * scale[:, None, None, None] - w)
    assert np.all(err <= scale[:, None, None, None] / 2 + 1e-7)


def test_merge_merge_needs_a_quantized_weight(tiny):
    fused = fuse_batchnorm(tiny)
    plan = _merge_plan(fused, 4, 7)
    no_grid = Plan(plan.method, plan.settings, tuple(dataclasses.replace(lp, uniform=None) if lp.name == "conv1" else lp
                                                     for lp in plan.layers))
    with pytest.raises(PlanError, match="adapter merging needs"):
        apply_plan(export_onnx(fused, 8), no_grid, merge_bits=7)


# ---- activation_qdq ------------------------------------------------------------


def _act_images(n=48, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageSet(imgs.numpy(), None, tuple(map(str, range(n))), Preprocess(size))


def _act_int8_tiny(tiny, bits=4, scheme=AVX2):
    fused = fuse_batchnorm(tiny)
    plan = search_rtn(fused, RtnSettings(bits=bits, selection=LayerSelection(keep=())))
    program = export_program(fused, 8)
    model = apply_plan(program.model, plan)
    ranges, qparams, report = add_activation_qdq(model, _act_images(), scheme)
    ir.passes.PassManager(cleanup_passes())(model)
    sim = ActivationQuantSim(program, apply_plan_torch(fused, plan), qparams, scheme.act_range,
                             shared=set(qparams) - set(ranges))
    return onnx_bytes(model), sim, qparams, report


def test_act_every_quantized_layer_is_an_integer_kernel(tiny):
    blob, _, _, report = _act_int8_tiny(tiny)
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


def test_act_ort_matches_pytorch_simulation_within_quantization_steps(tiny):
    blob, sim, qparams, _ = _act_int8_tiny(tiny)
    x = torch.from_numpy(next(_act_images(16, seed=1).batches(16)))
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


def test_act_weights_that_do_not_fit_stay_float(tiny, caplog):
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


def test_act_missing_ranges_are_refused_on_an_exported_model(tiny):
    fused = fuse_batchnorm(tiny)
    model = export_program(fused, 8).model
    with pytest.raises(PlanError, match="no calibrated range"):
        ActivationQDQPass({}, AVX2)(model)


# ---- codebook_decode ------------------------------------------------------------


def _pq_images(n=32, size=8):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(), None,
                    tuple(map(str, range(n))), Preprocess(input_size=size))


def _pq_session(blob):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


@pytest.fixture
def pq_planned(tiny):
    fused = fuse_batchnorm(tiny)
    plan = search_pq(fused, PqSettings(codewords=16, em_iters=4, finetune_steps=3, calib_size=32,
                                        selection=LayerSelection(keep=("first",))), _pq_images())
    return fused, plan


def test_pq_structure(pq_planned):
    fused, plan = pq_planned
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(fused, 8), plan)))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gather") == 3 and ops.count("DequantizeLinear") == 1  # conv1 kept at 8-bit uniform
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 1
    inits = {t.name: t for t in proto.graph.initializer}
    for lp in plan.layers[1:]:
        w = lp.weight
        assert w not in inits and f"{lp.name}.bias" not in inits  # float weight and old bias gone
        codes, books = inits[f"{w}_codes"], inits[f"{w}_codewords"]
        assert codes.data_type == onnx.TensorProto.UINT8 and len(codes.raw_data) == lp.codebook.codes.size
        assert books.data_type == onnx.TensorProto.FLOAT16 and list(books.dims) == list(lp.codebook.codewords.shape)
        assert inits[f"{w}_codescale"].data_type == onnx.TensorProto.FLOAT16
        made = [n for n in proto.graph.node if n.name.startswith(f"{w}_")]
        assert [n.op_type for n in made] == ["Cast", "Cast", "Gather", "Reshape", "Cast", "Mul", "Cast"]
        meta = [{p.key: p.value for p in n.metadata_props} for n in made]
        assert all(m["cora_onnx.pass"] == "CodebookDecodePass" for m in meta)
        assert [m.get("cora_onnx.block_size") for m in meta] == [None, None, str(lp.codebook.block_size)] + [None] * 4
        consumer = next(n for n in proto.graph.node if f"{w}_decoded" in n.input)
        assert inits[f"{lp.name}.bias_corrected"].data_type == onnx.TensorProto.FLOAT16  # Cast to float in the graph
        assert consumer.input[2] == f"{w}_bias_float" and made[-1].input == [f"{lp.name}.bias_corrected"]
    # the exporter's debug metadata (stack traces, FX node text) is not shipped
    assert not [p.key for n in proto.graph.node for p in n.metadata_props if p.key.startswith(("pkg.torch", "namespace"))]
    order = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    for i, n in enumerate(proto.graph.node):
        assert all(order.get(inp, -1) < i for inp in n.input)
    # no value_info copies of the initializers' type and shape; readers still get them
    assert not {v.name for v in proto.graph.value_info} & set(inits) and proto.graph.value_info
    onnx.checker.check_model(proto, full_check=True)
    back = ir.from_proto(proto).graph.initializers
    assert all(list(back[n].shape) == list(t.dims) for n, t in inits.items())


def test_pq_decoded_weights_are_exactly_the_torch_weights(pq_planned):
    fused, plan = pq_planned
    model = apply_plan(export_onnx(fused, 8), plan)
    names = [f"{lp.weight}_decoded" for lp in plan.layers if lp.codebook is not None]
    for n in names:  # expose the decoded weights as outputs
        value = next(v for node in model.graph for v in node.outputs if v.name == n)
        model.graph.outputs.append(value)
    sess = _pq_session(onnx_bytes(model))
    outs = sess.run(names, {"input": np.zeros((1, 3, 8, 8), np.float32)})
    ref = quantizable_layers(apply_plan_torch(fused, plan))
    for lp, got in zip([lp for lp in plan.layers if lp.codebook is not None], outs):
        np.testing.assert_array_equal(got, lp.codebook.decode(lp.shape))
        np.testing.assert_array_equal(got, ref[lp.name].weight.detach().numpy())
        np.testing.assert_array_equal(lp.codebook.bias, ref[lp.name].bias.detach().numpy())


def test_pq_export_parity_and_the_plan_changes_the_function(pq_planned):
    fused, plan = pq_planned
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan))
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(fused, plan)(x).numpy()
        flt = fused(x).numpy()
    out = _pq_session(blob).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.abs(ref - flt).max() > 1e-3  # 16 codewords really quantize
    out_opt = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out_opt, ref, atol=1e-4, rtol=1e-4)  # and with ORT's optimizations on


def test_pq_conv_without_bias_gets_the_corrected_bias(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    plan = search_pq(model, PqSettings(codewords=8, em_iters=3, finetune_steps=0, selection=LayerSelection(keep=())),
                     _pq_images())
    assert plan.layer("0").codebook.bias is not None
    blob = onnx_bytes(apply_plan(export_onnx(model, 8), plan))
    conv = next(n for n in onnx.load_from_string(blob).graph.node if n.op_type == "Conv")
    assert conv.input[2] == "0.weight_bias_float"  # Cast of the float16 initializer 0.bias_corrected
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(model, plan)(x).numpy()
    np.testing.assert_allclose(_pq_session(blob).run(None, {"input": x.numpy()})[0], ref, atol=1e-5, rtol=1e-5)


def test_pq_no_codebook_is_a_no_op_and_a_wrong_plan_is_refused(pq_planned):
    fused, plan = pq_planned
    model = export_onnx(fused, 8)
    assert not CodebookDecodePass(Plan("rtn", {}, ()))(model).modified
    cb = plan.layers[1].codebook
    bad = Plan("pq", {}, (LayerPlan(name="nope", kind="conv", shape=plan.layers[1].shape, codebook=cb),))
    with pytest.raises(PlanError, match="no initializer named nope.weight"):
        apply_plan(export_onnx(fused, 8), bad)
    with pytest.raises(PlanError, match="cannot decode to shape"):
        cb.decode((3, 3))
    with pytest.raises(PlanError, match="codes must be uint16 with 300 codewords"):
        Codebook(block_size=4, codewords=np.zeros((300, 4), np.float16), codes=np.zeros((2, 2), np.uint8))


# ---- low_rank_branch ------------------------------------------------------------


@pytest.mark.parametrize("bits", [None, 8])
def test_branch_branch_structure(tiny, bits):
    fused = fuse_batchnorm(tiny)
    shape = tuple(fused.pw.weight.shape)
    plan = Plan("cora", {}, (LayerPlan("pw", "conv", shape, adapter=random_adapter(shape, 3, bits, scale=1.0, seed=0)),))
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


def test_branch_adapter_on_grouped_conv_rejected(tiny):
    fused = fuse_batchnorm(tiny)
    shape = tuple(fused.dw.weight.shape)
    plan = Plan("cora", {}, (LayerPlan("dw", "conv", shape, adapter=random_adapter(shape, 1, None, scale=1.0, seed=0)),))
    with pytest.raises(PlanError, match="ungrouped"):
        apply_plan(export_onnx(fused, 8), plan)


def test_branch_bias_update_adds_and_replaces(tiny):
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


def test_branch_bias_added_to_conv_without_bias():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).eval()
    plan = Plan("cora", {}, (LayerPlan("0", "conv", (4, 3, 3, 3), bias=Bias(np.full(4, 0.5, np.float32))),))
    proto = onnx.load_from_string(onnx_bytes(apply_plan(export_onnx(m, 8), plan)))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert conv.input[2] == "0.bias"


# ---- packing ------------------------------------------------------------


class MidNet(torch.nn.Module):
    """Layers big enough to be packed (18432 and 36864 weights) around two that stay INT4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def mid():
    torch.manual_seed(0)
    return MidNet().eval()


def _packed_plan(model, bits, **kw):
    return search_rtn(model, RtnSettings(bits=bits, selection=LayerSelection(keep=()), **kw))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_weight_only_model(mid, bits, symmetric):
    plan = _packed_plan(mid, bits, symmetric=symmetric)
    blob = onnx_bytes(apply_plan(export_onnx(mid, 8), plan))
    proto = onnx.load_from_string(blob)
    inits = {t.name: t for t in proto.graph.initializer}
    k, g = packing.PACKED_BITS[bits]
    for name, n in (("conv2", 18432), ("conv3", 36864)):
        packed = inits[f"{name}.weight_quantized_packed"]
        assert packed.data_type == onnx.TensorProto.UINT8 and len(packed.raw_data) == n // k * g
        assert f"{name}.weight_quantized" not in inits
        assert inits[f"{name}.weight_zero_point"].data_type == (onnx.TensorProto.INT8 if symmetric else onnx.TensorProto.UINT8)
    for name in ("conv1", "fc"):  # too small to gain from packing
        assert inits[f"{name}.weight_quantized"].data_type == (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4)
    opt = optimized_graph(blob)
    assert not {n.op_type for n in opt.graph.node} & DECODE_OPS  # decoded at load
    assert sum(n.op_type == "DequantizeLinear" for n in opt.graph.node) == 4
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(mid, plan)(x).numpy()
        flt = mid(x).numpy()
    for optimize in (False, True):
        out = session(blob, optimize=optimize).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.abs(ref - flt).max() > 1e-3


def test_packed_sub_4_bit_files_are_smaller(mid):
    sizes = {b: len(onnx_bytes(apply_plan(export_onnx(mid, 8), _packed_plan(mid, b)))) for b in (2, 3, 4)}
    assert sizes[2] < sizes[3] < sizes[4]
    # the grids of conv2 and conv3 shrink by 1/8 (W3) and 1/4 (W2) of a byte per weight, less the
    # decoding nodes (under 1.2 kB per layer)
    assert sizes[4] - sizes[3] > 55296 / 8 - 2 * 1200 and sizes[4] - sizes[2] > 55296 / 4 - 2 * 1200


def _packed_images(n=32, size=8):
    from cora_onnx.onnx.data import ImageSet, Preprocess

    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSet(imgs.numpy(), None, tuple(map(str, range(n))), Preprocess(size))


def _packed_integer_model(mid, plan, merge_bits=None):
    program = export_program(mid, 8)
    model = apply_plan(program.model, plan, merge_bits)
    add_activation_qdq(model, _packed_images(), QuantScheme("uint8", 7, "test"))
    ir.passes.PassManager(cleanup_passes())(model)
    return onnx_bytes(model)


def test_packed_integer_kernels_form_with_packed_grids(mid, monkeypatch):
    """--act-bits 8: the packed 3-bit grids decode to INT8 at load and the convs still become
    QLinearConv, exactly as with the same grids in INT4 containers (same outputs too)."""
    plan = _packed_plan(mid, 3)
    packed = _packed_integer_model(mid, plan)
    monkeypatch.setattr(packing, "MIN_SAVING", 1 << 40)  # the same grids, every one in an INT4 container
    int4 = _packed_integer_model(mid, plan)
    assert len(packed) < len(int4)
    kp, k4 = integer_kernels(packed), integer_kernels(int4)
    assert kp["ops"].get("QLinearConv") == k4["ops"].get("QLinearConv") == 3
    assert kp["integer"] == k4["integer"] and kp["float_compute"] == k4["float_compute"] == 0
    assert not set(kp["ops"]) & DECODE_OPS
    x = next(_packed_images(8).batches(8))
    np.testing.assert_array_equal(session(packed).run(None, {"input": x})[0], session(int4).run(None, {"input": x})[0])


def test_packed_adapter_merge_reads_the_packed_grid(mid):
    plan = _packed_plan(mid, 3)
    rng = np.random.default_rng(1)
    a = (0.05 * rng.normal(size=(2, 32, 3, 3))).astype(np.float32)
    b = (0.05 * rng.normal(size=(64, 2, 1, 1))).astype(np.float32)
    layers = tuple(dataclasses.replace(lp, adapter=LowRankAdapter(2, a, b)) if lp.name == "conv2" else lp
                   for lp in plan.layers)
    plan = Plan(plan.method, plan.settings, layers)
    blob = onnx_bytes(apply_plan(export_onnx(mid, 8), plan, merge_bits=7))
    proto = onnx.load_from_string(blob)
    assert "conv2.weight_quantized_packed" in {t.name for t in proto.graph.initializer}
    assert not {n.op_type for n in optimized_graph(blob).graph.node} & (DECODE_OPS | {"QuantizeLinear"})
    x = torch.randn(2, 3, 8, 8)
    got = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = apply_plan_torch(mid, plan, merge_bits=7)(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
