"""WeightQDQPass: replace each planned Conv/Gemm weight by DequantizeLinear(integer grid)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.plan import Plan

from ._packing import grid_value, packs, zero_point_bits
from ._qdq import dequantized_weight
from ._util import default_opset, int_tensor, mark, planned_weight, require_weights

__all__ = ["WeightQDQPass"]


class WeightQDQPass(ir.passes.InPlacePass):
    """For every layer of the plan with a uniform grid, store the integer weight with its scale and
    zero point, and feed the consumers through a DequantizeLinear (axis 0 when per channel). The
    grid is stored tightly: 2 and 3 bits packed into UINT8 bytes with a constant decoding subgraph
    that ONNX Runtime folds at load (passes._packing; the zero point is then INT8/UINT8; grids too
    small to gain from it stay INT4), 4 bits as packed INT4/UINT4 (opset 21), 5-8 bits as
    INT8/UINT8. Names: <weight>_quantized (the grid; <weight>_quantized_packed for the bytes),
    _scale, _zero_point, _DequantizeLinear; the float initializer is removed."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.layers = [layer for layer in plan.layers if layer.uniform is not None and layer.codebook is None]

    def requires(self, model: ir.Model) -> None:
        need = 21 if any(layer.uniform.bits <= 4 and not packs(layer.uniform.bits, layer.uniform.q.size)
                         for layer in self.layers) else 13
        have = default_opset(model)
        if have < need:
            raise ir.passes.PreconditionError(
                f"WeightQDQPass needs opset >= {need} for the planned bit widths, the model has {have}")
        require_weights(model, self.layers)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in self.layers:
            u = layer.uniform
            old, consumers = planned_weight(graph, layer)
            w = layer.weight
            q, decode = grid_value(graph, f"{w}_quantized", u.q, u.bits, u.symmetric, type(self).__name__)
            scale = u.scale.astype(np.float32) if u.per_channel else u.scale.astype(np.float32).reshape(())
            zp_arr = u.zero_point if u.per_channel else u.zero_point.reshape(())
            zp_bits = zero_point_bits(u.bits, u.q.size)  # 8 next to a byte-packed grid
            dq = dequantized_weight(graph, w, q, scale, int_tensor(zp_arr, zp_bits, u.symmetric, f"{w}_zero_point"),
                                    layer.shape, axis=0 if u.per_channel else None)
            mark(dq, type(self).__name__, layer=layer.name, bits=u.bits,
                 granularity="per_channel" if u.per_channel else "per_tensor")
            if consumers:
                graph.insert_before(consumers[0], [*decode, dq])
            else:
                graph.extend([*decode, dq])
            old.replace_all_uses_with(dq.outputs[0])
            del graph.initializers[w]
            modified = True
        return ir.passes.PassResult(model, modified)
