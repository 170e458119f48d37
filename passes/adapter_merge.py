"""AdapterMergePass: CoRa adapters merged into their Conv's weight when ONNX Runtime loads the
model, instead of running as branch convolutions: into the integer weight for integer kernels
(8-bit activations), or into the float weight (float activations)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.npgrid import adapter_factors, merged_grid
from cora_onnx.core.plan import Plan

from ._merge import MERGE_BITS, Expression, grid_expression, requantize
from ._packing import packs
from ._util import add_initializer, default_opset, int_tensor, mark, planned_weight, require_weights

__all__ = ["AdapterMergePass"]


class AdapterMergePass(ir.passes.InPlacePass):
    """For every plan layer with an adapter, replace its Conv's float weight `<layer>.weight` by

        DequantizeLinear(QuantizeLinear(W_q + Reshape(MatMul(B, A)), s), s)

    where W_q is the layer's low-bit grid times its scales (passes._merge; the grid stored as
    WeightQDQPass stores it), the factors A, B are Cast(integer grid) * scale when quantized, and s
    (per output channel) puts W_q + B A on a symmetric `bits`-bit grid (bits: the CPU's integer
    weight width, 7 or 8). Every input is an initializer: ONNX Runtime's constant folding turns
    the expression into one INT8 weight when the session loads, and its QDQ fusion makes the Conv
    an integer kernel. The file keeps the low-bit grid and the small factors; the running model
    has no branch. Names: `<layer>.adapter_merge_*`; the QuantizeLinear carries the rank and
    adapter bytes (for `inspect`). The layer's weight is found by its float name and fingerprint
    (the pass runs on the float graph; WeightQDQPass then skips these layers).

    bits None (float activations): the sum is not re-quantized: the Conv reads
    Add(W_q, Reshape(MatMul(B, A))), whose inputs are all initializers, so ONNX Runtime folds it
    into one float weight at load and the running model is a plain Conv, as fast as the float
    model. The Add (`<layer>.adapter_merge_Add`) then carries the facts."""

    def __init__(self, plan: Plan, bits: int | None) -> None:
        super().__init__()
        if bits not in (*MERGE_BITS, None):
            raise ValueError(f"merged grids are 7 or 8 bits (None: merged in float), got {bits}")
        self.layers = [layer for layer in plan.layers if layer.adapter is not None]
        self.bits = bits

    def requires(self, model: ir.Model) -> None:
        bare = [layer.name for layer in self.layers if layer.uniform is None]
        if bare:
            raise PlanError(f"layer {bare[0]}: adapter merging needs a quantized weight (a uniform grid in the plan)")
        int4 = any((lp.uniform.bits <= 4 and not packs(lp.uniform.bits, lp.uniform.q.size)) or lp.uniform.group
                   or (lp.adapter.bits or 8) <= 4 for lp in self.layers)
        need = 21 if int4 else 13
        if self.layers and default_opset(model) < need:
            raise ir.passes.PreconditionError(f"AdapterMergePass needs opset >= {need} for the planned grids, the model "
                                              f"has {default_opset(model)}")
        require_weights(model, self.layers)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for layer in self.layers:
            old, users = planned_weight(graph, layer)
            convs = [n for n in users if n.op_type == "Conv" and n.inputs[1] is old]
            if len(convs) != 1 or len(users) != 1:
                raise PlanError(f"layer {layer.name}: adapter merging needs one Conv reading {layer.weight}, found "
                                f"{len(convs)} Conv(s) among {len(users)} user(s)")
            conv = convs[0]
            if conv.attributes.get_int("group", 1) != 1:
                raise PlanError(f"layer {layer.name}: adapters need an ungrouped Conv")
            ad = layer.adapter
            expr = Expression(graph, f"{layer.name}.adapter_merge")
            wq = grid_expression(expr, layer, type(self).__name__)
            b2, a2 = adapter_factors(layer)
            fb = self._factor(expr, "b", b2, ad.b_scale, ad.bits)
            fa = self._factor(expr, "a", a2, ad.a_scale, ad.bits)
            ba = expr.add("MatMul", [fb, fa], "MatMul")
            ba = expr.add("Reshape", [ba, expr.const("shape", list(layer.shape))], "Reshape")
            w = expr.add("Add", [wq, ba], "Add")
            facts = dict(layer=layer.name, rank=ad.rank, adapter_bytes=(ad.bits or 32) * ad.params // 8)
            if layer.uniform.group:
                facts["from_group"] = layer.uniform.group
            if self.bits is None:  # merged in float: the Conv reads the sum
                w.shape = ir.Shape(layer.shape)
                mark(expr.nodes[-1], type(self).__name__, **facts, merged="at load, in float")
                graph.insert_before(conv, expr.nodes)
                conv.replace_input_with(1, w)
            else:
                _, scale = merged_grid(layer, self.bits)
                q, dq = requantize(expr, w, layer, scale)
                mark(q, type(self).__name__, **facts, bits=self.bits, merged="at load")
                mark(dq, type(self).__name__, layer=layer.name, bits=self.bits, granularity="per_channel")
                graph.insert_before(conv, [*expr.nodes, q, dq])
                conv.replace_input_with(1, dq.outputs[0])
            del graph.initializers[layer.weight]
        return ir.passes.PassResult(model, bool(self.layers))

    @staticmethod
    def _factor(expr: Expression, which: str, values: np.ndarray, scale: np.ndarray | None,
                bits: int | None) -> ir.Value:
        """A factor as a float tensor: an initializer, or Cast(integer grid) * scale (no
        DequantizeLinear, which ONNX Runtime does not constant-fold in QDQ models)."""
        name = f"{expr.prefix}_{which}"
        if bits is None:
            return add_initializer(expr.graph, name, ir.Tensor(values.astype(np.float32), name=name))
        grid = np.rint(values / scale.reshape(-1, 1)).astype(np.int8)
        q = add_initializer(expr.graph, f"{name}_quantized", int_tensor(grid, bits, True, f"{name}_quantized"))
        s = expr.const(f"{which}_scale", scale.reshape(-1, 1), np.float32)
        return expr.add("Mul", [expr.add("Cast", [q], f"{which}_Cast", to=ir.DataType.FLOAT), s], f"{which}_Mul")
