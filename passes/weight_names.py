"""WeightNamesPass: give every planned weight its module name back in the exported graph.

The plan names a layer's weight `<module>.weight`, as the PyTorch model does. torch.onnx keeps that
name for a Conv and for a Linear on a 2-D input (Gemm with transB=1), but a Linear applied to a
4-D tensor (the MLP inside a ConvNeXt block, channels last) becomes a MatMul whose weight is the
transposed matrix, folded to a constant with a generated name (`val_5`). Such a weight is found by
its value (the plan's fingerprint of the float weight, transposed), never by its name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.plan import Plan, WeightFingerprint

from ._util import add_initializer, mark

__all__ = ["WeightNamesPass", "locate_weight"]

_MATMUL_B = {"MatMul": 1, "Gemm": 1}


def locate_weight(graph: ir.Graph, name: str, fingerprint: WeightFingerprint | None) -> tuple[ir.Value, bool] | None:
    """The initializer holding the float weight planned as `name` and whether it is stored
    transposed: (the initializer `name`, False) when its value is the fingerprinted one (or there is
    no fingerprint to check), else a constant that a MatMul/Gemm reads as its weight input (no
    transB) holding exactly the transposed weight, else a constant of another name holding exactly
    the weight (a renamed initializer). None when nothing holds it."""
    value = graph.initializers.get(name)
    if value is not None and (fingerprint is None or value.const_value is None
                              or fingerprint.mismatch(value.const_value.numpy()) is None):
        return value, False
    if fingerprint is None:
        return None
    shape = tuple(fingerprint.shape)
    for candidate in graph.initializers.values():
        tensor = candidate.const_value
        if tensor is None or candidate.name == name:
            continue
        cshape = tuple(candidate.shape) if candidate.shape is not None else ()
        if len(shape) == 2 and cshape == shape[::-1] and _read_as_weight(candidate):
            if fingerprint.mismatch(np.ascontiguousarray(tensor.numpy().T)) is None:
                return candidate, True
        elif cshape == shape and fingerprint.mismatch(tensor.numpy()) is None:
            return candidate, False
    return None


def _read_as_weight(value: ir.Value) -> bool:
    """Every use of value is the B input of a MatMul, or of a Gemm without transB."""
    uses = list(value.uses())
    return bool(uses) and all(
        _MATMUL_B.get(u.node.op_type) == u.idx
        and not (u.node.op_type == "Gemm" and u.node.attributes.get_int("transB", 0))
        for u in uses)


class WeightNamesPass(ir.passes.InPlacePass):
    """For every planned layer whose weight `<module>.weight` is not an initializer of the graph
    (or holds another value), find the constant holding it (locate_weight) and name it so: a
    renamed initializer is renamed back; a transposed one (MatMul weight) is replaced by the weight
    in the module's own (out, in) layout as `<module>.weight` followed by a Transpose node
    `<module>.weight_Transpose`, so the passes after it (weight grids, codebooks, biases) find and
    replace it like any other. Layers that cannot be located are left for those passes to refuse.
    Runs first in the plan pipeline."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.layers = list(plan.layers)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in self.layers:
            found = locate_weight(graph, layer.weight, getattr(layer, "fingerprint", None))
            if found is None or found[0].name == layer.weight or layer.weight in graph.initializers:
                continue  # in place, or not found / name taken: WeightQDQPass's checks refuse it with the reason
            value, transposed = found
            if not transposed:
                value.name = layer.weight
                modified = True
                continue
            w = np.ascontiguousarray(value.const_value.numpy().T)
            new = add_initializer(graph, layer.weight, ir.Tensor(w, name=layer.weight))
            node = ir.node("Transpose", [new], attributes={"perm": [1, 0]}, name=f"{layer.weight}_Transpose")
            out = node.outputs[0]
            out.name, out.dtype, out.shape = f"{layer.weight}_transposed", value.dtype, ir.Shape(w.shape[::-1])
            mark(node, type(self).__name__, layer=layer.name)
            graph.insert_before(next(iter(value.uses())).node, node)
            value.replace_all_uses_with(out)
            del graph.initializers[value.name]
            modified = True
        return ir.passes.PassResult(model, modified)
