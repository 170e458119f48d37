"""The one builder of QuantizeLinear / DequantizeLinear nodes, used by every pass that writes them.

Names derive from a base name with fixed suffixes: initializers `<base>_scale` and
`<base>_zero_point`, nodes `<base>_QuantizeLinear` (output `<base>_quantized`) and
`<base>_DequantizeLinear` (output `<base>_dequantized`, unless the caller names it). Output
types and shapes are annotated; provenance stays with the caller (`_util.mark`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from ._util import add_initializer, shared_const

__all__ = ["scale_zero_point", "quantize_linear", "dequantize_linear", "dequantized_weight", "expand_blocks",
           "int64_const"]


def scale_zero_point(graph: ir.Graph, base: str, scale: np.ndarray | float,
                     zero_point: ir.Tensor | np.ndarray) -> tuple[ir.Value, ir.Value]:
    """Register `<base>_scale` (float32) and `<base>_zero_point` (an ir.Tensor as given, e.g. a
    packed INT4 one from `int_tensor`, or a numpy array in its own dtype) as initializers."""
    s_name, z_name = f"{base}_scale", f"{base}_zero_point"
    s = add_initializer(graph, s_name, ir.Tensor(np.asarray(scale, dtype=np.float32), name=s_name))
    if not isinstance(zero_point, ir.Tensor):
        zero_point = ir.Tensor(np.asarray(zero_point), name=z_name)
    return s, add_initializer(graph, z_name, zero_point)


def _axis(axis: int | None) -> dict:
    return {} if axis is None else {"axis": axis}


def quantize_linear(x: ir.Value, scale: ir.Value, zero_point: ir.Value, base: str, dtype: ir.DataType,
                    shape: ir.Shape | Sequence[int] | None, axis: int | None = None) -> ir.Node:
    """QuantizeLinear(x, scale, zero_point) named `<base>_QuantizeLinear`, output `<base>_quantized`
    of `dtype` (the zero point's type); axis None: per tensor (no attribute)."""
    q = ir.node("QuantizeLinear", [x, scale, zero_point], attributes=_axis(axis), name=f"{base}_QuantizeLinear")
    out = q.outputs[0]
    out.name, out.dtype = f"{base}_quantized", dtype
    out.shape = shape if shape is None or isinstance(shape, ir.Shape) else ir.Shape(shape)
    return q


def dequantize_linear(q: ir.Value, scale: ir.Value, zero_point: ir.Value | None, base: str,
                      shape: ir.Shape | Sequence[int] | None, axis: int | None = None,
                      out_name: str | None = None, block_size: int = 0) -> ir.Node:
    """DequantizeLinear(q, scale, zero_point) named `<base>_DequantizeLinear`, float output
    `out_name` (default `<base>_dequantized`); axis None: per tensor (no attribute); zero_point
    None: no zero point input; block_size > 0: blocked quantization along axis (opset 21)."""
    attrs = _axis(axis) | ({"block_size": int(block_size)} if block_size else {})
    inputs = [q, scale] if zero_point is None else [q, scale, zero_point]
    dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{base}_DequantizeLinear")
    out = dq.outputs[0]
    out.name, out.dtype = out_name or f"{base}_dequantized", ir.DataType.FLOAT
    out.shape = shape if shape is None or isinstance(shape, ir.Shape) else ir.Shape(shape)
    return dq


def dequantized_weight(graph: ir.Graph, base: str, q: ir.Value, scale: np.ndarray | float,
                       zero_point: ir.Tensor | np.ndarray, shape: ir.Shape | Sequence[int],
                       axis: int | None = None, out_name: str | None = None) -> ir.Node:
    """An integer constant `q` (initializer or decoded grid) made float: its scale and zero point
    registered (`scale_zero_point`) and the DequantizeLinear that reads them (not yet inserted)."""
    s, z = scale_zero_point(graph, base, scale, zero_point)
    return dequantize_linear(q, s, z, base, shape, axis, out_name)


def int64_const(graph: ir.Graph, what: str, values: Sequence[int]) -> ir.Value:
    """A shared INT64 vector initializer named by its value (`cora_onnx.<what>_<v1>_<v2>...`)."""
    name = f"cora_onnx.{what}_" + "_".join(str(int(v)).replace("-", "m") for v in values)
    return shared_const(graph, name, np.array(list(values), np.int64))


def expand_blocks(graph: ir.Graph, params: ir.Value, axis: int, block_size: int, length: int,
                  base: str) -> tuple[ir.Value, list[ir.Node]]:
    """Blocked quantization parameters (`params`: one value per `block_size` consecutive elements
    along `axis`, static shape) repeated to one value per element: Unsqueeze after the axis,
    Expand to the block size, Reshape (the blocks side by side), Slice to `length` when the last
    block is partial. Every shape constant is shared by value between layers; nodes are named
    `<base>_<op>` and returned in order, not inserted; the last one's output is the result."""
    dims = [int(d) for d in params.shape]
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value]) -> ir.Value:
        node = ir.node(op, inputs, name=f"{base}_{op}")
        node.outputs[0].name, node.outputs[0].dtype = f"{base}_{op}_output", params.dtype
        nodes.append(node)
        return node.outputs[0]

    x = add("Unsqueeze", [params, int64_const(graph, "axes", [axis + 1])])
    x = add("Expand", [x, int64_const(graph, "expand", [1] * (axis + 1) + [block_size] + [1] * (len(dims) - axis - 1))])
    x = add("Reshape", [x, int64_const(graph, "shape", [0] * axis + [-1] + dims[axis + 1:])])
    if dims[axis] * block_size != length:
        x = add("Slice", [x, int64_const(graph, "zero", [0]), int64_const(graph, "end", [length]),
                          int64_const(graph, "axes", [axis])])
    return x, nodes
