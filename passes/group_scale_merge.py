"""GroupScaleMergePass: a weight with group-wise scales re-quantized to one scale per output
channel when ONNX Runtime loads the model, so its Conv/Gemm/MatMul can run as an integer kernel
(those take one weight scale per output channel)."""

from __future__ import annotations

import onnx_ir as ir

from cora_onnx.core.npgrid import merged_grid
from cora_onnx.core.plan import Plan

from ._merge import MERGE_BITS, Expression, grid_expression, requantize
from ._util import default_opset, mark, planned_weight, require_weights

__all__ = ["GroupScaleMergePass"]


class GroupScaleMergePass(ir.passes.InPlacePass):
    """For every plan layer with group-wise scales (UniformWeights.group) and no adapter (an
    adapter layer's grid is merged by AdapterMergePass), replace its float weight `<layer>.weight`
    by DequantizeLinear(QuantizeLinear(W_q, s), s): W_q is Cast(grid (C_out, K)) * the group
    scales repeated along K, Reshaped to the weight's shape (passes._merge), and s (per output
    channel) puts W_q on a symmetric `bits`-bit grid (7 or 8). ONNX Runtime folds the expression
    into one INT8 weight at load; the file keeps the low-bit grid and its float16 group scales.
    Names: `<layer>.group_merge_*`. Every user of the weight (Conv, Gemm, MatMul) reads the result."""

    def __init__(self, plan: Plan, bits: int) -> None:
        super().__init__()
        if bits not in MERGE_BITS:
            raise ValueError(f"merged grids are 7 or 8 bits, got {bits}")
        self.layers = [layer for layer in plan.layers if layer.uniform is not None and layer.uniform.group
                       and layer.adapter is None and layer.codebook is None]
        self.bits = bits

    def requires(self, model: ir.Model) -> None:
        if self.layers and default_opset(model) < 21:
            raise ir.passes.PreconditionError(f"GroupScaleMergePass needs opset >= 21 (INT4 grids), the model has "
                                              f"{default_opset(model)}")
        require_weights(model, self.layers)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for layer in self.layers:
            old, users = planned_weight(graph, layer)
            expr = Expression(graph, f"{layer.name}.group_merge")
            wq = grid_expression(expr, layer, type(self).__name__)
            _, scale = merged_grid(layer, self.bits)
            q, dq = requantize(expr, wq, layer, scale)
            mark(q, type(self).__name__, layer=layer.name, bits=self.bits, from_group=layer.uniform.group,
                 merged="at load")
            mark(dq, type(self).__name__, layer=layer.name, bits=self.bits, granularity="per_channel")
            nodes = [*expr.nodes, q, dq]
            if users:
                graph.insert_before(users[0], nodes)
            else:
                graph.extend(nodes)
            old.replace_all_uses_with(dq.outputs[0])
            del graph.initializers[layer.weight]
        return ir.passes.PassResult(model, bool(self.layers))
