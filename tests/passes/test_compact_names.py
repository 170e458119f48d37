"""CompactNamesPass alone, and the byte measure built on it (cora_onnx.onnx.sizes), on the tiny graph."""

import itertools

import numpy as np
import onnx
import pytest

from cora_onnx.core.encoding import Encoding, skeleton
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.core.plan import Plan
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.onnx.sizes import MARGIN, compact, measure_costs
from passes import CompactNamesPass
from passes.compact_names import name_width, short_name

KINDS = {"conv1": "conv", "pw": "conv", "fc": "linear"}


def test_short_names():
    assert [short_name(i) for i in (0, 9, 10, 61, 62, 3843, 3844)] == ["0", "9", "a", "Z", "10", "ZZ", "100"]
    assert short_name(5, 3) == "005" and name_width(62) == 1 and name_width(63) == 2 and name_width(3845) == 3


def test_compact_names_keep_the_function_and_drop_the_names(graph):
    model = graph.model()
    before = len(onnx_bytes(model))
    want = graph.run(model)
    p = CompactNamesPass(width=2)
    assert p(model).modified
    proto = onnx.load_from_string(onnx_bytes(model))
    inits = [t.name for t in proto.graph.initializer]
    outputs = [o for n in proto.graph.node for o in n.output if o != "logits"]
    assert all(len(n) == 2 for n in inits + outputs) and len(set(inits + outputs)) == len(inits + outputs)
    assert p.names[inits[0]] == "conv1.weight" and set(p.names.values()) >= {"conv1.bias", "relu_out", "pw_out"}
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert all(not n.name for n in proto.graph.node) and not proto.graph.value_info
    conv = next(n for n in proto.graph.node if n.op_type == "Conv" and len(n.attribute) < 3)
    assert {a.name for a in conv.attribute} <= {"kernel_shape", "pads"}  # no default group/strides/dilations
    assert len(onnx_bytes(model)) < before
    np.testing.assert_allclose(graph.run(model), want, rtol=1e-6, atol=1e-6)


def test_a_width_too_small_for_the_values_is_refused(graph):
    import onnx_ir as ir

    model = graph.model()
    with pytest.raises(ir.passes.PreconditionError, match="83 values do not fit names of 1 characters"):
        CompactNamesPass(width=1)(_many_values(model))


def _many_values(model):
    """The tiny graph with 70 extra Identity nodes: more values than one base-62 digit names."""
    import onnx_ir as ir

    x = model.graph.outputs[0].producer().outputs[0]
    last = model.graph.node(-1)
    for i in range(70):
        node = ir.node("Identity", [x], name=f"id{i}")
        model.graph.insert_after(last, node)
        last = node
    return model


def test_every_choice_costs_the_fixed_bytes_plus_its_layers(graph):
    """The byte measure: for any choice among the menus, the compacted file is the fixed bytes plus the
    chosen encodings' bytes (the fixed bytes include MARGIN, a few bytes of length prefixes)."""
    shapes = {"conv1": (8, 3, 3, 3), "pw": (6, 8, 1, 1), "fc": (5, 6)}
    menus = {"conv1": [Encoding("uniform", 8), Encoding("uniform", 4), Encoding("uniform", 3, 9), Encoding("uniform", 2),
                       Encoding("uniform", 2, rank=2, adapter_bits=4), Encoding("pq", block=9, codewords=4)],
             "pw": [Encoding("uniform", 4), Encoding("uniform", 2), Encoding("pq", block=4, codewords=6),
                    Encoding("uniform", 4, rank=1, adapter_bits=8)],
             "fc": [Encoding("uniform", 8), Encoding("uniform", 3), Encoding("pq", block=2, codewords=4)]}
    model = graph.model()
    table = measure_costs(model, {n: (shapes[n], KINDS[n]) for n in shapes}, menus)
    assert set(table.costs) == set(shapes) and all(set(table.costs[n]) == {e.label for e in menus[n]} for n in menus)
    for combo in itertools.product(*menus.values()):
        plan = Plan("auto", {}, tuple(skeleton(n, shapes[n], KINDS[n], e) for n, e in zip(menus, combo)))
        m = apply_plan(graph.model(), plan)
        compact(m, table.width)
        size = len(onnx_bytes(m))
        predicted = table.fixed + sum(table.costs[n][e.label] for n, e in zip(menus, combo))
        assert predicted - MARGIN - 4 <= size <= predicted, [e.label for e in combo]
    assert table.least() == table.fixed + sum(min(c.values()) for c in table.costs.values())
