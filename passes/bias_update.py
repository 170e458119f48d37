"""BiasUpdatePass: the planned bias of a Conv/Gemm replaces (or becomes) its bias input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Plan

from ._util import add_initializer, check_fingerprint

__all__ = ["BiasUpdatePass"]


class BiasUpdatePass(ir.passes.InPlacePass):
    """For every layer with a planned bias: overwrite the initializer `<layer>.bias`, or, when the
    layer had no bias, add it as the third input of the Conv/Gemm that uses `<layer>.weight`.
    Run it before WeightQDQPass (it finds layers by the float weight name, and checks the weight's
    fingerprint: a bias planned for a weight the exporter rewrote would be wrong)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.layers = [layer for layer in plan.layers if layer.bias is not None]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for layer in self.layers:
            values = layer.bias.values.astype(np.float32)
            name = f"{layer.name}.bias"
            w = graph.initializers.get(layer.weight)
            if w is not None:  # the bias was planned for this weight: a fused BatchNorm changes both
                check_fingerprint(w, layer)
            if name in graph.initializers:
                old = graph.initializers[name]
                if len(old.uses()) != 1:
                    raise PlanError(f"layer {layer.name}: bias {name} is shared by {len(old.uses())} nodes")
                old.const_value = ir.Tensor(values, name=name)
                old.shape = ir.Shape(values.shape)
                continue
            users = [u.node for u in w.uses() if u.node.op_type in ("Conv", "Gemm") and u.idx == 1] if w is not None else []
            if len(users) != 1:
                raise PlanError(f"layer {layer.name}: no single Conv/Gemm uses {layer.weight} to take the new bias")
            node = users[0]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                raise PlanError(f"layer {layer.name}: its bias input is not the initializer {name}")
            b = add_initializer(graph, name, ir.Tensor(values, name=name))
            node.resize_inputs(3)
            node.replace_input_with(2, b)
        return ir.passes.PassResult(model, bool(self.layers))
