"""WeightDecodePass: constant weight DequantizeLinear nodes rewritten as standard ops that ONNX
Runtime folds when it loads the model, so a weight-only file runs at float speed in a plain
session.

ONNX Runtime's constant folding skips DequantizeLinear (unless the session sets
`session.disable_quant_qdq=1`, which also turns off every integer fusion): a weight-only INT4
file then dequantizes every weight at every inference. The same arithmetic written with Cast,
Sub and Mul (and Reshape/Expand/Slice for blocked scales) is folded at load like any constant
subgraph, as the packed 2-3-bit grids' decoding already is. The file keeps the same integer
initializers (INT4, INT8, packed bytes) and stays a plain ONNX model any runtime reads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._qdq import expand_blocks, int64_const
from ._util import PROVENANCE_KEY, mark

__all__ = ["WeightDecodePass", "DECODED_FROM_KEY", "is_constant"]

DECODED_FROM_KEY = "cora_onnx.decoded_from"  # on the decoding Mul: the pass that wrote the DequantizeLinear


def is_constant(value: ir.Value | None, memo: dict | None = None) -> bool:
    """Whether `value` is known when the model loads: an initializer that is not a graph input, or
    the output of nodes whose inputs all are (no graph input on the way)."""
    memo = {} if memo is None else memo
    if value is None:
        return True  # an omitted optional input
    key = id(value)
    if key not in memo:
        memo[key] = False  # a cycle is not constant
        if value.is_graph_input():
            memo[key] = False
        elif value.const_value is not None:
            memo[key] = True
        else:
            node = value.producer()
            memo[key] = node is not None and not _has_subgraph(node) and all(is_constant(v, memo) for v in node.inputs)
    return memo[key]


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _in_qdq_group(dq: ir.Node, memo: dict) -> bool:
    """Whether a consumer of dq also reads a non-constant DequantizeLinear (an activation): then dq
    is the weight of a QDQ node group that ONNX Runtime fuses into an integer kernel. A Transpose
    between them (a Linear's weight read by a MatMul) counts as part of the weight."""
    users = [u.node for u in dq.outputs[0].uses()]
    users += [u.node for t in users if t.op_type == "Transpose" for u in t.outputs[0].uses()]
    for user in users:
        for v in user.inputs:
            p = v.producer() if v is not None else None
            if p is not None and p is not dq and p.op_type == "DequantizeLinear" and not is_constant(v, memo):
                return True
    return False


class WeightDecodePass(ir.passes.InPlacePass):
    """Replace every DequantizeLinear whose inputs are all constant (see `is_constant`) by

        Mul(Sub(Cast(q), Cast(zero point)), scale)       (no Sub when the zero point is 0 or absent)

    in the DequantizeLinear's output type, the scale and zero point laid out to broadcast along its
    axis (per-axis initializers used only here are reshaped in place; otherwise a Reshape node),
    blocked scales (block_size) repeated along the axis (`_qdq.expand_blocks`). The arithmetic is
    DequantizeLinear's, in float32, so ONNX Runtime computes the same weights. DequantizeLinear
    nodes of a QDQ group (a consumer also reads a dequantized activation) stay: ONNX Runtime fuses
    those into integer kernels.

    Names: `<base>_Cast`, `_zero_point_Cast`, `_Sub`, `_Mul`, where base is the DequantizeLinear's
    name without `_DequantizeLinear` (outputs named as their nodes; the Mul's output keeps the
    DequantizeLinear's output name, so consumers and shapes are unchanged). The Mul takes over the DequantizeLinear's
    provenance facts (layer, bits, granularity, group) and records the pass that wrote it under
    DECODED_FROM_KEY."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        memo: dict = {}
        targets = [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")
                   and all(is_constant(v, memo) for v in n.inputs) and not _in_qdq_group(n, memo)]
        for dq in targets:
            self._decode(graph, dq)
        return ir.passes.PassResult(model, bool(targets))

    def _decode(self, graph: ir.Graph, dq: ir.Node) -> None:
        q, scale = dq.inputs[0], dq.inputs[1]
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        out = dq.outputs[0]
        base = (dq.name or f"{out.name}_decode").removesuffix("_DequantizeLinear")
        rank = len(q.shape) if q.shape is not None else None
        block = dq.attributes.get_int("block_size", 0)
        scalar = scale.shape is not None and len(scale.shape) == 0
        axis = None if scalar else dq.attributes.get_int("axis", 1)
        if axis is not None:
            if rank is None:
                raise ir.passes.PreconditionError(f"{dq.name}: per-axis DequantizeLinear on a value of unknown rank")
            axis %= rank
        dtype = scale.dtype or ir.DataType.FLOAT
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list, suffix: str, **attrs) -> ir.Value:
            node = ir.node(op, inputs, attributes=attrs, name=f"{base}_{suffix}")
            node.outputs[0].name = node.name
            nodes.append(node)
            return node.outputs[0]

        def laid_out(v: ir.Value, what: str) -> ir.Value:
            """A per-axis parameter broadcastable against q: blocks repeated along the axis, or a
            1-D vector shaped (C, 1, ..., 1) from the axis on."""
            if axis is None:
                return v
            if block:
                expanded, more = expand_blocks(graph, v, axis, block, int(q.shape[axis]), f"{base}_{what}")
                nodes.extend(more)
                return expanded
            shape = (-1,) + (1,) * (rank - axis - 1)
            if len(shape) == 1:
                return v
            if v.const_value is not None and not v.is_graph_input() and len(v.uses()) == 1:
                arr = v.const_value.numpy()
                v.const_value = ir.Tensor(arr.reshape(shape), dtype=v.const_value.dtype, name=v.name)
                v.shape = ir.Shape(v.const_value.shape)
                return v
            return add("Reshape", [v, int64_const(graph, "shape", shape)], f"{what}_Reshape")

        x = add("Cast", [q], "Cast", to=dtype)
        if zp is not None and not _all_zero(zp):
            z = add("Cast", [zp], "zero_point_Cast", to=dtype)
            x = add("Sub", [x, laid_out(z, "zero_point")], "Sub")
        mul = ir.node("Mul", [x, laid_out(scale, "scale")], name=f"{base}_Mul")
        nodes.append(mul)
        for node in nodes:
            node.outputs[0].dtype = dtype
        facts = {k: v for k, v in dq.metadata_props.items() if k.startswith("cora_onnx.") and k != PROVENANCE_KEY}
        mul.metadata_props.update(facts)
        mark(mul, type(self).__name__)
        if PROVENANCE_KEY in dq.metadata_props:
            mul.metadata_props[DECODED_FROM_KEY] = dq.metadata_props[PROVENANCE_KEY]
        graph.insert_before(dq, nodes)
        name, shape = out.name, out.shape
        out.replace_all_uses_with(mul.outputs[0], replace_graph_outputs=True)
        graph.remove(dq, safe=True)
        out.name = None
        mul.outputs[0].name, mul.outputs[0].shape = name, shape


def _all_zero(v: ir.Value) -> bool:
    return v.const_value is not None and not np.any(v.const_value.numpy().astype(np.int64))

