"""BiasUpdatePass: the planned bias of a Conv/Gemm replaces (or becomes) its bias input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Plan

from ._util import add_initializer, check_fingerprint, mark

__all__ = ["BiasUpdatePass"]


class BiasUpdatePass(ir.passes.InPlacePass):
    """For every layer with a planned bias: overwrite the initializer `<layer>.bias`, or, when the
    layer had no bias, add it as the third input of the Conv/Gemm that uses `<layer>.weight` (in
    place of a zero constant the exporter may have given it).
    A bias stored as float16 (Bias.dtype) becomes the FLOAT16 initializer `<layer>.bias_half`
    read through `<layer>.bias_Cast` (to float, output `<layer>.bias_float`), which ONNX Runtime
    folds at load; the float32 one is left for cleanup.
    Run it before WeightQDQPass (it finds layers by the float weight name, and checks the weight's
    fingerprint: a bias planned for a weight the exporter rewrote would be wrong)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.layers = [layer for layer in plan.layers if layer.bias is not None]

    def requires(self, model: ir.Model) -> None:
        inits = model.graph.initializers
        missing = [lp.name for lp in self.layers if lp.weight not in inits and f"{lp.name}.bias" not in inits]
        if missing:
            raise PlanError(f"plan does not fit the ONNX model: no initializer named {missing[0]}.weight or "
                            f"{missing[0]}.bias for its planned bias")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for layer in self.layers:
            values = layer.bias.values.astype(np.float32)
            name = f"{layer.name}.bias"
            w = graph.initializers.get(layer.weight)
            if w is not None:  # the bias was planned for this weight: a fused BatchNorm changes both
                check_fingerprint(w, layer)
            half = layer.bias.dtype == "float16"
            if name in graph.initializers:
                old = graph.initializers[name]
                if len(old.uses()) != 1:
                    raise PlanError(f"layer {layer.name}: bias {name} is shared by {len(old.uses())} nodes")
                if half:
                    use = old.uses()[0]
                    use.node.replace_input_with(use.idx, self._half(graph, layer, name, values, use.node))
                    continue
                old.const_value = ir.Tensor(values, name=name)
                old.shape = ir.Shape(values.shape)
                continue
            users = [u.node for u in w.uses() if u.node.op_type in ("Conv", "Gemm") and u.idx == 1] if w is not None else []
            if len(users) != 1:
                raise PlanError(f"layer {layer.name}: no single Conv/Gemm uses {layer.weight} to take the new bias")
            node = users[0]
            old = node.inputs[2] if len(node.inputs) > 2 else None
            if old is not None and not _zero_constant(old, node):
                raise PlanError(f"layer {layer.name}: its bias input {old.name} is not the initializer {name} "
                                f"and not a zero constant of this node alone")
            b = self._half(graph, layer, name, values, node) if half else \
                add_initializer(graph, name, ir.Tensor(values, name=name))
            node.resize_inputs(3)
            node.replace_input_with(2, b)  # an exporter's zero bias (Conv without bias) is left for cleanup
        return ir.passes.PassResult(model, bool(self.layers))

    @staticmethod
    def _half(graph: ir.Graph, layer, name: str, values: np.ndarray, before: ir.Node) -> ir.Value:
        """The float16 initializer `<name>_half` and the Cast to float inserted before `before`; returns its output."""
        h = add_initializer(graph, f"{name}_half", ir.Tensor(values.astype(np.float16), name=f"{name}_half"))
        cast = ir.node("Cast", [h], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_Cast")
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = f"{name}_float", ir.DataType.FLOAT, ir.Shape(values.shape)
        mark(cast, "BiasUpdatePass", layer=layer.name)
        graph.insert_before(before, cast)
        return out


def _zero_constant(value: ir.Value, node: ir.Node) -> bool:
    """Whether value is a constant of zeros read by node alone: the bias torch.onnx writes for a Conv
    that has none in PyTorch (DenseNet's conv2 before a Concat), which the planned bias replaces."""
    tensor = value.const_value
    if tensor is None or any(u.node is not node for u in value.uses()):
        return False
    return not np.any(tensor.numpy())
