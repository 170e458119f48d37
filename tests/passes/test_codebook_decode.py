"""CodebookDecodePass alone on the tiny graph (tinygraph.py), no torch: one behaviour per test."""

import numpy as np
import onnx_ir as ir
import pytest

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Codebook, LayerPlan, Plan, WeightFingerprint
from passes import CodebookDecodePass
from tinygraph import plan_error

SHAPE = (6, 8, 1, 1)  # pw: 2 sub-vectors of 4 per filter


def _codebook(k=5, codes_dtype=np.uint8, **kw):
    rng = np.random.default_rng(3)
    return Codebook(4, rng.normal(size=(k, 4)).astype(np.float16), rng.integers(0, k, size=(6, 2)).astype(codes_dtype),
                    **kw)


@pytest.mark.parametrize("scale_dtype", [None, np.float16, np.float32])
def test_a_weight_becomes_its_decoded_codebook(graph, scale_dtype):
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


def test_the_layer_facts_go_on_its_gather_only(graph):
    model = graph.model()
    CodebookDecodePass(Plan("pq", {}, (LayerPlan("pw", "conv", SHAPE, codebook=_codebook()),)))(model)
    made = [n for n in model.graph if n.name.startswith("pw.weight_")]
    assert [n.op_type for n in made] == ["Cast", "Cast", "Gather", "Reshape"]
    assert all(n.metadata_props["cora_onnx.pass"] == "CodebookDecodePass" for n in made)
    assert [n.metadata_props.get("cora_onnx.block_size") for n in made] == [None, None, "4", None]


def test_more_than_256_codewords_take_uint16_codes(graph):
    cb = _codebook(k=300, codes_dtype=np.uint16)
    model = graph.model()
    CodebookDecodePass(Plan("pq", {}, (LayerPlan("pw", "conv", SHAPE, codebook=cb),)))(model)
    assert model.graph.initializers["pw.weight_codes"].dtype == ir.DataType.UINT16
    np.testing.assert_allclose(graph.run(model), graph.run(graph.proto(pw__weight=cb.decode(SHAPE))), rtol=1e-5,
                               atol=1e-5)


def test_a_float16_bias_is_cast_to_float_for_the_conv(graph):
    cb = _codebook(bias=np.linspace(-1, 1, 6).astype(np.float16))
    model = graph.model()
    CodebookDecodePass(Plan("pq", {}, (LayerPlan("pw", "conv", SHAPE, codebook=cb),)))(model)
    assert model.graph.initializers["pw.bias_corrected"].dtype == ir.DataType.FLOAT16
    assert graph.nodes(model)["pw"].inputs[2].name == "pw.weight_bias_float"
    want = graph.run(graph.proto(pw__weight=cb.decode(SHAPE), pw__bias=cb.bias.astype(np.float32)))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-5, atol=1e-5)


def test_a_conv_without_bias_gets_the_corrected_one(graph):
    cb = _codebook(bias=np.ones(6, np.float32))
    model = graph.model(pw_bias=False)
    CodebookDecodePass(Plan("pq", {}, (LayerPlan("pw", "conv", SHAPE, codebook=cb),)))(model)
    assert graph.nodes(model)["pw"].inputs[2].name == "pw.bias_corrected"
    want = graph.run(graph.proto(pw__weight=cb.decode(SHAPE), pw__bias=cb.bias))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-5, atol=1e-5)


def test_a_plan_without_codebooks_is_a_no_op(graph):
    assert not CodebookDecodePass(Plan("rtn", {}, ()))(graph.model()).modified


def test_a_weight_the_graph_does_not_have_is_refused(graph):
    plan = Plan("pq", {}, (LayerPlan("nope", "conv", SHAPE, codebook=_codebook()),))
    assert "no initializer named nope.weight" in str(plan_error(lambda: CodebookDecodePass(plan)(graph.model())))


def test_a_rewritten_weight_is_refused(graph):
    w = graph.weights["pw.weight"]
    plan = Plan("pq", {}, (LayerPlan("pw", "conv", SHAPE, codebook=_codebook(), fingerprint=WeightFingerprint.of(w)),))
    err = plan_error(lambda: CodebookDecodePass(plan)(graph.model(pw__weight=w * np.float32(1.1))))
    assert "not the float weight the plan was made from" in str(err)


def test_codes_that_do_not_fit_their_codewords_are_refused():
    with pytest.raises(PlanError, match="codes must be uint16 with 300 codewords"):
        Codebook(block_size=4, codewords=np.zeros((300, 4), np.float16), codes=np.zeros((2, 2), np.uint8))
    with pytest.raises(PlanError, match="cannot decode to shape"):
        _codebook().decode((3, 3))
