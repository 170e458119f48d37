"""LowRankBranchPass: beside each planned Conv, the CoRa branch Conv(A) -> Conv(B, 1x1) -> Add."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import LowRankAdapter, Plan

from ._qdq import dequantized_weight
from ._util import add_initializer, check_fingerprint, int_tensor, mark

__all__ = ["LowRankBranchPass"]


class LowRankBranchPass(ir.passes.InPlacePass):
    """For every layer of the plan with an adapter, find the Conv that consumes `<layer>.weight`,
    add Conv(x, A) with the same kernel, strides, pads and dilations (rank output channels), then a
    1x1 Conv(B) back to the output channels, and Add the branch to the Conv's output. Quantized
    adapters are stored as INT8 (or packed INT4 at 4 bits and fewer) with a per-channel
    DequantizeLinear. Names: `<layer>.adapter_a` / `.adapter_b` (+ `.weight`, `_quantized`, `_scale`,
    `_zero_point`), `<layer>.adapter_add`. Run it before WeightQDQPass (it finds Convs by the float
    weight name)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.layers = [layer for layer in plan.layers if layer.adapter is not None]

    def requires(self, model: ir.Model) -> None:
        missing = [layer.weight for layer in self.layers if layer.weight not in model.graph.initializers]
        if missing:
            raise PlanError(f"plan does not fit the ONNX model: no initializer named {', '.join(missing[:5])}")

    def _weight(self, graph: ir.Graph, name: str, values: np.ndarray, ad: LowRankAdapter, which: str) -> ir.Value:
        if ad.bits is None:
            return add_initializer(graph, f"{name}.weight", ir.Tensor(values.astype(np.float32), name=f"{name}.weight"))
        scale = ad.a_scale if which == "a" else ad.b_scale
        q = add_initializer(graph, f"{name}_quantized", int_tensor(ad.integers(which), ad.bits, True, f"{name}_quantized"))
        zp = int_tensor(np.zeros(scale.shape, np.int8), ad.bits, True, f"{name}_zero_point")
        dq = dequantized_weight(graph, name, q, scale, zp, values.shape, axis=0, out_name=f"{name}.weight")
        mark(dq, type(self).__name__, layer=name, bits=ad.bits, granularity="per_channel")
        self._new.append(dq)
        return dq.outputs[0]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in self.layers:
            w = graph.initializers[layer.weight]
            check_fingerprint(w, layer)
            convs = [use.node for use in w.uses() if use.node.op_type == "Conv" and use.idx == 1]
            if len(convs) != 1:
                raise PlanError(f"layer {layer.name}: expected one Conv using {layer.weight}, found {len(convs)}")
            conv = convs[0]
            if conv.attributes.get_int("group", 1) != 1:
                raise PlanError(f"layer {layer.name}: adapters need an ungrouped Conv")
            ad = layer.adapter
            self._new: list[ir.Node] = []
            name = layer.name
            wa = self._weight(graph, f"{name}.adapter_a", ad.a, ad, "a")
            wb = self._weight(graph, f"{name}.adapter_b", ad.b, ad, "b")
            attrs = {k: v for k, v in conv.attributes.items() if k in ("strides", "pads", "dilations", "auto_pad")}
            attrs["kernel_shape"] = ir.AttrInt64s("kernel_shape", list(ad.a.shape[2:]))
            a = ir.node("Conv", [conv.inputs[0], wa], attributes=attrs, name=f"{name}.adapter_a")
            b = ir.node("Conv", [a.outputs[0], wb], attributes={"kernel_shape": [1, 1]}, name=f"{name}.adapter_b")
            out = conv.outputs[0]
            add = ir.node("Add", [out, b.outputs[0]], name=f"{name}.adapter_add")
            a.outputs[0].name, b.outputs[0].name = f"{name}.adapter_a_output", f"{name}.adapter_b_output"
            add.outputs[0].name = f"{name}.adapter_add_output"
            for v in (a.outputs[0], b.outputs[0], add.outputs[0]):
                v.dtype = ir.DataType.FLOAT
            adapter_bytes = (ad.bits or 32) * ad.params // 8
            for node in (a, b, add):
                mark(node, type(self).__name__, layer=name, rank=ad.rank, adapter_bytes=adapter_bytes)
            out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            add.replace_input_with(0, out)
            graph.insert_after(conv, [*self._new, a, b, add])
            modified = True
        return ir.passes.PassResult(model, modified)
