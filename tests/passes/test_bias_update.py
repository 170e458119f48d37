"""BiasUpdatePass alone on a tiny graph built in the test (tests/passes/conftest.py)."""

import numpy as np
import onnx_ir as ir
import pytest

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Bias, LayerPlan, Plan, WeightFingerprint
from passes import BiasUpdatePass
from tinygraph import plan_error


def _plan(graph, **biases):
    kinds = {"conv1": "conv", "pw": "conv", "fc": "linear"}
    return Plan("cora", {}, tuple(LayerPlan(name, kinds[name], graph.SHAPES[f"{name}.weight"], bias=Bias(values))
                                  for name, values in biases.items()))


def test_replaces_a_bias_and_adds_a_missing_one(graph):
    """conv1's bias initializer takes the planned values (same value object, one user); pw, exported
    without a bias, gets `pw.bias` as its third input; ONNX Runtime computes what the float graph
    computes with those biases."""
    rng = np.random.default_rng(5)
    new = {"conv1": rng.normal(size=8).astype(np.float32), "pw": rng.normal(size=6).astype(np.float32)}
    model = graph.model(pw_bias=False)
    old = model.graph.initializers["conv1.bias"]
    assert BiasUpdatePass(_plan(graph, **new))(model).modified
    nodes = {n.name: n for n in model.graph}
    assert nodes["conv1"].inputs[2] is old and np.array_equal(old.const_value.numpy(), new["conv1"])
    assert len(nodes["pw"].inputs) == 3 and nodes["pw"].inputs[2] is model.graph.initializers["pw.bias"]
    np.testing.assert_array_equal(model.graph.initializers["pw.bias"].const_value.numpy(), new["pw"])
    want = graph.run(graph.proto(conv1__bias=new["conv1"], pw__bias=new["pw"]))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-6, atol=1e-6)
    assert np.abs(want - graph.run(graph.proto())).max() > 1e-2


def test_no_planned_bias_is_a_no_op(graph):
    assert not BiasUpdatePass(Plan("cora", {}, (LayerPlan("pw", "conv", graph.SHAPES["pw.weight"]),)))(graph.model()).modified


@pytest.mark.parametrize("case", ["no layer", "no node"])
def test_refuses_what_it_cannot_place(graph, case):
    model = graph.model()
    if case == "no layer":  # a layer the graph does not have
        plan = Plan("cora", {}, (LayerPlan("other", "conv", (8, 3, 3, 3), bias=Bias(np.zeros(8, np.float32))),))
        match = "no initializer named other.weight or other.bias"
    else:  # conv1.bias read by two nodes, and conv1.weight by none: no node tells conv1's own
        conv1 = next(n for n in model.graph if n.name == "conv1")
        pw = next(n for n in model.graph if n.name == "pw")
        pw.replace_input_with(2, conv1.inputs[2])
        conv1.replace_input_with(1, pw.inputs[1])
        plan = _plan(graph, conv1=np.zeros(8, np.float32))
        match = "bias conv1.bias is shared by 2 nodes, and no single Conv/Gemm"
    with pytest.raises(Exception) as err:
        BiasUpdatePass(plan)(model)
    cause = err.value
    while not isinstance(cause, PlanError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, PlanError) and match in str(cause)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_bias_shared_among_layers_is_replaced_in_its_own_node_only(graph, dtype):
    """The exporter stores equal biases of several layers as one initializer under the first one's
    name (random weights' zero biases). Each planned layer's bias replaces it in that layer's own
    node only: conv1's as conv1.bias_corrected (conv1.bias being the shared name), pw's as pw.bias;
    a layer not planned keeps reading the shared one."""
    model = graph.model()
    nodes = {n.name: n for n in model.graph}
    shared = nodes["conv1"].inputs[2]
    nodes["pw"].replace_input_with(2, shared)  # shapes aside: the pass places biases, it does not run them
    rng = np.random.default_rng(8)
    new = {"conv1": Bias.narrowest(rng.normal(size=8)) if dtype == "float16" else Bias(np.ones(8, np.float32))}
    plan = Plan("cora", {}, (LayerPlan("conv1", "conv", graph.SHAPES["conv1.weight"], bias=new["conv1"]),))
    assert BiasUpdatePass(plan)(model).modified
    got = nodes["conv1"].inputs[2]
    got = got.producer().inputs[0] if dtype == "float16" else got
    assert got.name == ("conv1.bias_corrected_half" if dtype == "float16" else "conv1.bias_corrected")
    np.testing.assert_array_equal(got.const_value.numpy().astype(np.float32), new["conv1"].values)
    assert nodes["pw"].inputs[2] is shared and np.array_equal(shared.const_value.numpy(), graph.weights["conv1.bias"])
    model = graph.model()
    nodes = {n.name: n for n in model.graph}
    shared = nodes["conv1"].inputs[2]
    nodes["pw"].replace_input_with(2, shared)
    model.graph.initializers.pop("pw.bias")  # as exported: the shared one stands for it
    assert BiasUpdatePass(_plan(graph, pw=np.ones(6, np.float32)))(model).modified
    assert nodes["pw"].inputs[2] is model.graph.initializers["pw.bias"] and nodes["conv1"].inputs[2] is shared


def test_float16_biases_are_stored_half_and_compute_the_same(graph):
    """A float16 bias (Bias.narrowest) is a FLOAT16 initializer behind a Cast, for a replaced bias
    and for an added one; ONNX Runtime computes what the float graph computes with those values."""
    rng = np.random.default_rng(6)
    new = {"conv1": Bias.narrowest(rng.normal(size=8)), "pw": Bias.narrowest(rng.normal(size=6))}
    assert all(b.dtype == "float16" for b in new.values())
    model = graph.model(pw_bias=False)
    kinds = {"conv1": "conv", "pw": "conv"}
    plan = Plan("auto", {}, tuple(LayerPlan(n, kinds[n], graph.SHAPES[f"{n}.weight"], bias=b) for n, b in new.items()))
    assert BiasUpdatePass(plan)(model).modified
    nodes = {n.name: n for n in model.graph}
    for name in new:
        bias = nodes[name].inputs[2]
        assert bias.producer().op_type == "Cast" and bias.producer().inputs[0].dtype == ir.DataType.FLOAT16
        assert bias.producer().inputs[0].name == f"{name}.bias_half"
    want = graph.run(graph.proto(conv1__bias=new["conv1"].values, pw__bias=new["pw"].values))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-6, atol=1e-6)


def test_a_float16_bias_must_hold_float16_values():
    with pytest.raises(PlanError, match="exactly representable in float16"):
        Bias(np.array([0.1], np.float32), dtype="float16")
    wide = Bias.narrowest(np.array([1e6, 0.5], np.float32))  # out of float16's range: stays float32
    assert wide.dtype == "float32" and wide.values[0] == 1e6


def test_a_bias_planned_for_another_weight_is_refused(graph):
    """A bias is planned for its weight: when the initializer under the weight's name is not that
    weight (an exporter fused a BatchNorm into both), the bias would be wrong too."""
    w = graph.weights["conv1.weight"]
    plan = Plan("cora", {}, (LayerPlan("conv1", "conv", w.shape, bias=Bias(np.zeros(8, np.float32)),
                                       fingerprint=WeightFingerprint.of(w)),))
    assert BiasUpdatePass(plan)(graph.model()).modified
    err = plan_error(lambda: BiasUpdatePass(plan)(graph.model(conv1__weight=w * np.float32(1.1))))
    assert "not the float weight the plan was made from" in str(err)


@pytest.mark.parametrize("zero", [True, False])
def test_an_exporters_zero_bias_is_replaced(graph, zero):
    """torch.onnx gives a Conv without a PyTorch bias a zero constant of a generated name when the
    Conv is not fused with a BatchNorm (DenseNet's conv2, before a Concat): the planned bias
    replaces it. A nonzero constant of another name is not the layer's bias to overwrite: refused."""
    model = graph.model()
    pw = next(n for n in model.graph if n.name == "pw")
    old = pw.inputs[2]
    values = np.zeros(6, np.float32) if zero else np.full(6, 0.5, np.float32)
    old.const_value = ir.Tensor(values, name="val_7")
    model.graph.initializers.pop(old.name)
    old.name = "val_7"
    model.graph.register_initializer(old)
    new = np.random.default_rng(7).normal(size=6).astype(np.float32)
    if not zero:
        with pytest.raises(Exception, match="val_7 is not the initializer pw.bias"):
            BiasUpdatePass(_plan(graph, pw=new))(model)
        return
    assert BiasUpdatePass(_plan(graph, pw=new))(model).modified
    assert pw.inputs[2] is model.graph.initializers["pw.bias"] and not old.uses()
    want = graph.run(graph.proto(pw__bias=new))
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-6, atol=1e-6)
