"""BiasUpdatePass: the planned bias of a Conv/Gemm replaces (or becomes) its bias input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Plan

from ._util import add_initializer, bias_adds, check_fingerprint, mark

__all__ = ["BiasUpdatePass"]


class BiasUpdatePass(ir.passes.InPlacePass):
    """For every layer with a planned bias: overwrite the initializer `<layer>.bias` when the layer
    alone reads it; else put it in the place of the layer's bias (_bias_input: the third input of
    the Conv/Gemm that uses `<layer>.weight`, or the Add after its Transpose -> MatMul), in that
    node only: in place of a zero constant the exporter may have given a layer without bias, or of
    a bias initializer the exporter shares among layers of equal biases (then as
    `<layer>.bias_corrected` when `<layer>.bias` is that shared one's name).
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
            old = graph.initializers.get(name)
            if old is not None and len(old.uses()) == 1:  # the layer's own bias initializer
                if half:
                    use = old.uses()[0]
                    use.node.replace_input_with(use.idx, self._half(graph, layer, name, values, use.node))
                    continue
                old.const_value = ir.Tensor(values, name=name)
                old.shape = ir.Shape(values.shape)
                continue
            node, idx = _bias_input(layer, w, old)
            current = node.inputs[idx] if len(node.inputs) > idx else None
            if current is not None and not (_zero_constant(current, node) or _bias_parameter(current)):
                raise PlanError(f"layer {layer.name}: its bias input {current.name} is not the initializer {name}, "
                                f"a bias initializer shared among layers or a zero constant of this node alone")
            if name in graph.initializers:  # a bias the exporter shares among layers (equal values) keeps the name
                name = f"{layer.name}.bias_corrected"
            b = self._half(graph, layer, name, values, node) if half else \
                add_initializer(graph, name, ir.Tensor(values, name=name))
            if len(node.inputs) <= idx:
                node.resize_inputs(idx + 1)
            node.replace_input_with(idx, b)  # this node only; an exporter's zero bias is left for cleanup
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


def _bias_input(layer, w: ir.Value | None, shared: ir.Value | None) -> tuple[ir.Node, int]:
    """The node and input index that add the layer's bias: the third input of the one Conv/Gemm
    reading its weight, or for a Linear the exporter wrote as Transpose -> MatMul -> Add, that
    Add's initializer input. PlanError when there is no such single place (`shared`: the layer's
    bias initializer, read by several nodes, for the message)."""
    uses = list(w.uses()) if w is not None else []
    convs = [u.node for u in uses if u.node.op_type in ("Conv", "Gemm") and u.idx == 1]
    if len(convs) == 1:
        return convs[0], 2
    adds = bias_adds([u.node for u in uses]) if not convs else []
    if len(adds) == 1:
        return adds[0]
    if shared is not None:
        raise PlanError(f"layer {layer.name}: bias {shared.name} is shared by {len(shared.uses())} nodes, and no "
                        f"single Conv/Gemm (or MatMul -> Add after a Transpose) of {layer.weight} tells its own")
    raise PlanError(f"layer {layer.name}: no single Conv/Gemm (or MatMul -> Add after a Transpose) uses "
                    f"{layer.weight} to take the new bias")


def _bias_parameter(value: ir.Value) -> bool:
    """Whether value is an initializer under a bias parameter's name (`<module>.bias`): the
    exporter stores equal biases of several layers (random weights' zero biases) as one, under the
    first one's name. A constant the exporter computed has a generated name."""
    return value.is_initializer() and value.name.endswith(".bias")


def _zero_constant(value: ir.Value, node: ir.Node) -> bool:
    """Whether value is a constant of zeros read by node alone: the bias torch.onnx writes for a Conv
    that has none in PyTorch (DenseNet's conv2 before a Concat), which the planned bias replaces."""
    tensor = value.const_value
    if tensor is None or any(u.node is not node for u in value.uses()):
        return False
    return not np.any(tensor.numpy())
