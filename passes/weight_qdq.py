"""WeightQDQPass: replace each planned Conv/Gemm weight by DequantizeLinear(integer grid)."""

from __future__ import annotations

from typing import Collection

import numpy as np
import onnx_ir as ir

from cora_onnx.core.plan import Plan

from ._packing import grid_value, packs, zero_point_bits
from ._qdq import dequantize_linear, dequantized_weight
from ._util import add_initializer, default_opset, int_tensor, mark, planned_weight, require_weights

__all__ = ["WeightQDQPass", "grouped_weight_dq"]


class WeightQDQPass(ir.passes.InPlacePass):
    """For every layer of the plan with a uniform grid, store the integer weight with its scale and
    zero point, and feed the consumers through a DequantizeLinear (axis 0 when per channel). The
    grid is stored tightly: 2 and 3 bits packed into UINT8 bytes with a constant decoding subgraph
    that ONNX Runtime folds at load (passes._packing; the zero point is then INT8/UINT8; grids too
    small to gain from it stay INT4), 4 bits as packed INT4/UINT4 (opset 21), 5-8 bits as
    INT8/UINT8. Names: <weight>_quantized (the grid; <weight>_quantized_packed for the bytes),
    _scale, _zero_point, _DequantizeLinear; the float initializer is removed.

    Group-wise scales (UniformWeights.group > 0): the grid is stored as a 2-D (C_out, K) tensor
    (same containers), the scales as a FLOAT16 (C_out, ceil(K / group)) initializer `<weight>_scale`
    Cast to float (`<weight>_scale_Cast`), read by DequantizeLinear(axis=1, block_size=group) without
    zero point (opset 21), whose output `<weight>_dequantized_2d` is Reshaped to the weight's shape
    (`<weight>_Reshape`, output `<weight>_dequantized`). Every input is an initializer."""

    def __init__(self, plan: Plan, exclude: Collection[str] = ()) -> None:
        """exclude: names of layers whose grid another pass writes (AdapterMergePass,
        GroupScaleMergePass in the merged layout)."""
        super().__init__()
        skip = frozenset(exclude)
        self.layers = [layer for layer in plan.layers
                       if layer.uniform is not None and layer.codebook is None and layer.name not in skip]

    def requires(self, model: ir.Model) -> None:
        need = 21 if any((layer.uniform.bits <= 4 and not packs(layer.uniform.bits, layer.uniform.q.size))
                         or layer.uniform.group for layer in self.layers) else 13
        have = default_opset(model)
        if have < need:
            what = "group-wise scales (DequantizeLinear block_size)" if any(layer.uniform.group for layer in self.layers) \
                else "the planned bit widths"
            raise ir.passes.PreconditionError(
                f"WeightQDQPass needs opset >= {need} for {what}, the model has {have}")
        require_weights(model, self.layers)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in self.layers:
            u = layer.uniform
            old, consumers = planned_weight(graph, layer)
            w = layer.weight
            if u.group:
                nodes = self._grouped(graph, layer)
                if consumers:
                    graph.insert_before(consumers[0], nodes)
                else:
                    graph.extend(nodes)
                old.replace_all_uses_with(nodes[-1].outputs[0])
                del graph.initializers[w]
                modified = True
                continue
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

    def _grouped(self, graph: ir.Graph, layer) -> list[ir.Node]:
        """The nodes (in order) that make a grouped layer's float weight (class doc)."""
        u, w = layer.uniform, layer.weight
        c = u.q.shape[0]
        k = u.q.size // c
        q, decode = grid_value(graph, f"{w}_quantized", u.q.reshape(c, k), u.bits, True, type(self).__name__)
        s16 = add_initializer(graph, f"{w}_scale", ir.Tensor(u.scale.astype(np.float16), name=f"{w}_scale"))
        cast = ir.node("Cast", [s16], attributes={"to": ir.DataType.FLOAT}, name=f"{w}_scale_Cast")
        cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = \
            f"{w}_scale_float", ir.DataType.FLOAT, ir.Shape(u.scale.shape)
        dq = dequantize_linear(q, cast.outputs[0], None, w, (c, k), axis=1, out_name=f"{w}_dequantized_2d",
                               block_size=u.group)
        mark(dq, type(self).__name__, layer=layer.name, bits=u.bits, granularity="per_group", group=u.group)
        shape = add_initializer(graph, f"{w}_shape", ir.Tensor(np.array(layer.shape, np.int64), name=f"{w}_shape"))
        rs = ir.node("Reshape", [dq.outputs[0], shape], name=f"{w}_Reshape")
        rs.outputs[0].name, rs.outputs[0].dtype, rs.outputs[0].shape = \
            f"{w}_dequantized", ir.DataType.FLOAT, ir.Shape(layer.shape)
        return [*decode, cast, dq, rs]


def grouped_weight_dq(value: ir.Value | None) -> ir.Node | None:
    """The blocked DequantizeLinear (a block_size attribute: group-wise scales) that `value` is the
    output of, directly or through a Reshape (as WeightQDQPass writes a grouped weight); else None."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Reshape" and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "DequantizeLinear" or not node.attributes.get_int("block_size", 0):
        return None
    return node
