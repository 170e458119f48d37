import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.core.errors import PlanError
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes, quantizable_layers
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import Codebook, LayerPlan, Plan
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq
from passes import CodebookDecodePass


def _images(n=32, size=8):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(), None,
                    tuple(map(str, range(n))), Preprocess(input_size=size))


def _session(blob):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


@pytest.fixture
def planned(tiny):
    fused = fuse_batchnorm(tiny)
    plan = search_pq(fused, PqSettings(codewords=16, em_iters=4, finetune_steps=3, calib_size=32,
                                        selection=LayerSelection(keep=("first",))), _images())
    return fused, plan


def test_structure(planned):
    fused, plan = planned
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


def test_decoded_weights_are_exactly_the_torch_weights(planned):
    fused, plan = planned
    model = apply_plan(export_onnx(fused, 8), plan)
    names = [f"{lp.weight}_decoded" for lp in plan.layers if lp.codebook is not None]
    for n in names:  # expose the decoded weights as outputs
        value = next(v for node in model.graph for v in node.outputs if v.name == n)
        model.graph.outputs.append(value)
    sess = _session(onnx_bytes(model))
    outs = sess.run(names, {"input": np.zeros((1, 3, 8, 8), np.float32)})
    ref = quantizable_layers(apply_plan_torch(fused, plan))
    for lp, got in zip([lp for lp in plan.layers if lp.codebook is not None], outs):
        np.testing.assert_array_equal(got, lp.codebook.decode(lp.shape))
        np.testing.assert_array_equal(got, ref[lp.name].weight.detach().numpy())
        np.testing.assert_array_equal(lp.codebook.bias, ref[lp.name].bias.detach().numpy())


def test_export_parity_and_the_plan_changes_the_function(planned):
    fused, plan = planned
    blob = onnx_bytes(apply_plan(export_onnx(fused, 8), plan))
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(fused, plan)(x).numpy()
        flt = fused(x).numpy()
    out = _session(blob).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.abs(ref - flt).max() > 1e-3  # 16 codewords really quantize
    out_opt = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out_opt, ref, atol=1e-4, rtol=1e-4)  # and with ORT's optimizations on


def test_conv_without_bias_gets_the_corrected_bias(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    plan = search_pq(model, PqSettings(codewords=8, em_iters=3, finetune_steps=0, selection=LayerSelection(keep=())),
                     _images())
    assert plan.layer("0").codebook.bias is not None
    blob = onnx_bytes(apply_plan(export_onnx(model, 8), plan))
    conv = next(n for n in onnx.load_from_string(blob).graph.node if n.op_type == "Conv")
    assert conv.input[2] == "0.weight_bias_float"  # Cast of the float16 initializer 0.bias_corrected
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(model, plan)(x).numpy()
    np.testing.assert_allclose(_session(blob).run(None, {"input": x.numpy()})[0], ref, atol=1e-5, rtol=1e-5)


def test_no_codebook_is_a_no_op_and_a_wrong_plan_is_refused(planned):
    fused, plan = planned
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


@pytest.mark.parametrize("scale_dtype", [None, np.float16, np.float32])
def test_the_pass_alone_on_a_graph_built_here(graph, scale_dtype):
    """CodebookDecodePass alone on a tiny onnx.helper graph: the 1x1 conv's weight becomes
    Gather(codewords, codes) -> Reshape [-> Mul(scale)], its bias the corrected one, and ONNX
    Runtime computes what the float graph computes with Codebook.decode's weight and that bias."""
    rng = np.random.default_rng(3)
    shape = graph.SHAPES["pw.weight"]  # (6, 8, 1, 1): 2 sub-vectors of 4 per filter
    cb = Codebook(4, rng.normal(size=(5, 4)).astype(np.float16), rng.integers(0, 5, size=(6, 2)).astype(np.uint8),
                  scale=None if scale_dtype is None else rng.uniform(0.5, 2, 6).astype(scale_dtype),
                  bias=rng.normal(size=6).astype(np.float32))
    model = graph.model()
    assert CodebookDecodePass(Plan("pq", {}, (LayerPlan("pw", "conv", shape, codebook=cb),)))(model).modified
    inits = model.graph.initializers
    assert "pw.weight" not in inits
    assert inits["pw.weight_codes"].dtype == ir.DataType.UINT8 and inits["pw.weight_codewords"].dtype == ir.DataType.FLOAT16
    nodes = {n.name: n for n in model.graph}
    pw = nodes["pw"]
    assert pw.inputs[1].name == "pw.weight_decoded" and pw.inputs[2].name == "pw.bias_corrected"
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.metadata_props["cora_onnx.block_size"] == "4" and gather.metadata_props["cora_onnx.codewords"] == "5"
    assert [n.op_type for n in model.graph].count("Mul") == (0 if scale_dtype is None else 1)
    want = graph.run(graph.proto(pw__weight=cb.decode(shape), pw__bias=cb.bias))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-5, atol=1e-5)
