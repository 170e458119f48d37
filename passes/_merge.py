"""The weight expressions that ONNX Runtime constant-folds into one per-channel integer weight at
load: shared by AdapterMergePass (a grid plus its low-rank adapter) and GroupScaleMergePass (a
grid with group-wise scales). Not a pass.

Both write, for a planned layer, from the plan alone (not from what another pass wrote):

    W_q   = Cast(grid) [- zero point] * scale            (per channel or per tensor), or
          = Reshape(Cast(grid (C_out, K)) * group scales repeated along K)   (group-wise scales;
            the repeat is _qdq.expand_blocks)
    W     = W_q [+ Reshape(MatMul(B, A))]
    out   = DequantizeLinear(QuantizeLinear(W, s, 0), s, 0)      s per output channel, 7 or 8 bits
            (AdapterMergePass with bits None: W itself, folded into a float weight)

The grid is stored as WeightQDQPass stores it (`<weight>_quantized`: packed bytes, INT4 or INT8;
group scales `<weight>_scale` in float16); every other name is `<layer>.<prefix>_*`. Every input is
an initializer, so ONNX Runtime folds the expression at load and its QDQ fusion makes the
consumer an integer kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.plan import LayerPlan

from ._packing import grid_value
from ._qdq import dequantize_linear, expand_blocks, quantize_linear, scale_zero_point
from ._util import add_initializer, mark

__all__ = ["MERGE_BITS", "Expression", "grid_expression", "requantize"]

MERGE_BITS = (7, 8)  # the integer weight widths of ONNX Runtime's x86 kernels (7: without VNNI)


class Expression:
    """Nodes of a constant expression built in order under a name prefix; `add` appends a node
    whose float output is named `<node name>_output`."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.nodes = graph, prefix, []

    def const(self, suffix: str, values, dtype=np.int64) -> ir.Value:
        name = f"{self.prefix}_{suffix}"
        return add_initializer(self.graph, name, ir.Tensor(np.asarray(values, dtype), name=name))

    def add(self, op: str, inputs: list[ir.Value], suffix: str, **attrs) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=f"{self.prefix}_{suffix}")
        node.outputs[0].name, node.outputs[0].dtype = f"{node.name}_output", ir.DataType.FLOAT
        self.nodes.append(node)
        return node.outputs[0]


def grid_expression(expr: Expression, layer: LayerPlan, pass_name: str) -> ir.Value:
    """W_q of the layer's uniform grid (module doc), its grid stored as WeightQDQPass stores it."""
    u, w = layer.uniform, layer.weight
    if u.group:
        c = u.q.shape[0]
        k = u.q.size // c
        grid, decode = grid_value(expr.graph, f"{w}_quantized", u.q.reshape(c, k), u.bits, True, pass_name)
        expr.nodes += decode
        s16 = add_initializer(expr.graph, f"{w}_scale", ir.Tensor(u.scale.astype(np.float16), name=f"{w}_scale"))
        s = expr.add("Cast", [s16], "group_scale_Cast", to=ir.DataType.FLOAT)
        s.shape = ir.Shape(u.scale.shape)
        s, repeat = expand_blocks(expr.graph, s, 1, u.group, k, f"{expr.prefix}_group_scale")
        expr.nodes += repeat
        g = expr.add("Cast", [grid], "grid_Cast", to=ir.DataType.FLOAT)
        wq = expr.add("Mul", [g, s], "grid_Mul")  # float32 products, as DequantizeLinear(block_size) computes
        mark(expr.nodes[-1], pass_name, layer=layer.name, bits=u.bits, granularity="per_group", group=u.group)
        return expr.add("Reshape", [wq, expr.const("weight_shape", list(layer.shape))], "grid_Reshape")
    grid, decode = grid_value(expr.graph, f"{w}_quantized", u.q, u.bits, u.symmetric, pass_name)
    expr.nodes += decode
    bshape = (-1,) + (1,) * (len(layer.shape) - 1)
    wq = expr.add("Cast", [grid], "grid_Cast", to=ir.DataType.FLOAT)
    zp = np.asarray(u.zero_point, np.float32)
    if np.any(zp != 0):
        wq = expr.add("Sub", [wq, expr.const("grid_zero", zp.reshape(bshape if zp.size > 1 else ()), np.float32)],
                      "grid_Sub")
    sc = np.asarray(u.scale, np.float32)
    return expr.add("Mul", [wq, expr.const("grid_scale", sc.reshape(bshape if sc.size > 1 else ()), np.float32)],
                    "grid_Mul")


def requantize(expr: Expression, value: ir.Value, layer: LayerPlan, scale: np.ndarray) -> tuple[ir.Node, ir.Node]:
    """QuantizeLinear -> DequantizeLinear of `value` (the layer's float weight expression) on a
    symmetric per-output-channel grid of `scale` (axis 0, INT8 container), not yet inserted."""
    s, z = scale_zero_point(expr.graph, expr.prefix, scale, np.zeros(scale.shape, np.int8))
    q = quantize_linear(value, s, z, expr.prefix, ir.DataType.INT8, layer.shape, axis=0)
    return q, dequantize_linear(q.outputs[0], s, z, expr.prefix, layer.shape, axis=0)
