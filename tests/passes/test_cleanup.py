"""The cleanup that ends every pipeline (cora_onnx.onnx.pipeline.cleanup_passes: unused nodes and
initializers out, unused opsets out, topological order, full ONNX checker) on a tiny graph built here."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from cora_onnx.onnx.pipeline import cleanup_passes


def _with_dead_code(graph):
    """The tiny graph with a dead branch (Identity -> Neg that nobody reads), an unused initializer
    and an unused opset import."""
    proto = graph.proto()
    proto.graph.node.extend([helper.make_node("Identity", ["input"], ["dead_1"], name="dead_identity"),
                             helper.make_node("Neg", ["dead_1"], ["dead_2"], name="dead_neg")])
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused.weight"))
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return ir.serde.deserialize_model(proto)


def test_cleanup_removes_dead_code(graph):
    model = _with_dead_code(graph)
    assert ir.passes.PassManager(cleanup_passes())(model).modified
    assert [n.name for n in model.graph] == ["conv1", "relu", "pw", "pool", "gap", "flatten", "fc"]
    assert "unused.weight" not in model.graph.initializers and "com.microsoft" not in model.opset_imports
    np.testing.assert_array_equal(graph.run(model), graph.run(graph.proto()))


def test_cleanup_sorts_nodes_a_pass_appended_out_of_order(graph):
    model = graph.model()
    conv1 = next(n for n in model.graph)
    model.graph.remove(conv1)
    model.graph.append(conv1)  # now last, after the nodes that read its output
    assert ir.passes.PassManager(cleanup_passes())(model).modified
    assert [n.name for n in model.graph] == ["conv1", "relu", "pw", "pool", "gap", "flatten", "fc"]
    np.testing.assert_array_equal(graph.run(model), graph.run(graph.proto()))


def test_cleanup_of_a_clean_graph_changes_nothing(graph):
    model = graph.model()
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not ir.passes.PassManager(cleanup_passes())(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_the_checker_refuses_an_invalid_graph(graph):
    """The full checker ends the cleanup: an INT4 DequantizeLinear (opset 21) in an opset-18 graph,
    what a pass without its opset precondition would write, fails it."""
    from passes._util import add_initializer, int_tensor

    model = graph.model(opset=18)
    g = model.graph
    pw = next(n for n in g if n.name == "pw")
    q = add_initializer(g, "pw.weight_quantized", int_tensor(np.zeros((6, 8, 1, 1), np.int8), 4, True, "pw.weight_quantized"))
    s = add_initializer(g, "pw.weight_scale", ir.Tensor(np.ones((), np.float32), name="pw.weight_scale"))
    dq = ir.node("DequantizeLinear", [q, s], name="pw.weight_DequantizeLinear")
    g.insert_before(pw, dq)
    pw.replace_input_with(1, dq.outputs[0])
    with pytest.raises(ir.passes.PassError) as err:
        ir.passes.PassManager(cleanup_passes())(model)
    chain = [err.value]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    assert any("CheckerPass" in str(e) for e in chain)  # the checker failed, after the three cleaning passes
    assert isinstance(chain[-1], (onnx.checker.ValidationError, onnx.shape_inference.InferenceError))
    assert "DequantizeLinear" in str(chain[-1]) and "int4" in str(chain[-1])
