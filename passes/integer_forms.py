"""IntegerFormsPass: float ops rewritten into the equivalent ops ONNX Runtime has integer (QDQ)
kernels for, before activation QDQ is placed.

- ReduceMean over the two spatial axes of a 4-D tensor (what torch.onnx's dynamo exporter writes
  for adaptive average pooling to 1x1 and for `x.mean((2, 3))`) -> GlobalAveragePool, which ONNX
  Runtime runs on 8-bit data (QLinearGlobalAveragePool, channels-last); a DequantizeLinear ->
  ReduceMean -> QuantizeLinear stays float, with a Transpose back to NCHW in front of it.
  keepdims=0 adds a Reshape to (N, C).
- Flatten(axis=1) -> Reshape(0, -1): the same tensor, but ONNX Runtime drops the QDQ pair around a
  Reshape (runs it on 8-bit data) and not around a Flatten.

Names: the new node's output keeps the replaced output's name (the name torch.onnx gave it after
the exported program's node, which the PyTorch simulation of integer activations finds); with
keepdims=0 the GlobalAveragePool output keeps it and the Reshape to (N, C) writes
`<name>_2d`. New nodes are `<replaced node>_GlobalAveragePool` / `_Reshape`, marked with this pass.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._util import mark, shared_const

__all__ = ["IntegerFormsPass"]

_FLAT = "cora_onnx.shape_0_m1"  # the shared [0, -1] shape constant (same name as _qdq.int64_const's)


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        p = value.producer()
        if p is None or p.op_type != "Constant" or "value" not in p.attributes:
            return None
        tensor = p.attributes["value"].as_tensor()
    return [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _spatial_mean(node: ir.Node) -> bool:
    """ReduceMean over axes {2, 3} of a 4-D input (axes as input from opset 18, else attribute)."""
    x = node.inputs[0] if node.inputs else None
    if x is None or x.shape is None or len(x.shape) != 4:
        return False
    axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else \
        (list(node.attributes["axes"].as_ints()) if "axes" in node.attributes else None)
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


class IntegerFormsPass(ir.passes.InPlacePass):
    """Rewrite spatial means as GlobalAveragePool and Flatten(axis 1) as Reshape (module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "ReduceMean" and _spatial_mean(node):
                keep = node.attributes.get_int("keepdims", 1)
                new = [ir.node("GlobalAveragePool", [node.inputs[0]], name=f"{node.name}_GlobalAveragePool")]
                if not keep:
                    new.append(ir.node("Reshape", [new[0].outputs[0], self._flat(graph)], name=f"{node.name}_Reshape"))
                self._replace(graph, node, new, keep)
                modified = True
            elif node.op_type == "Flatten" and node.attributes.get_int("axis", 1) == 1:
                self._replace(graph, node, [ir.node("Reshape", [node.inputs[0], self._flat(graph)],
                                                    name=f"{node.name}_Reshape")], True)
                modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _flat(graph: ir.Graph) -> ir.Value:
        return shared_const(graph, _FLAT, np.array([0, -1], np.int64))

    def _replace(self, graph: ir.Graph, node: ir.Node, new: list[ir.Node], last_keeps_name: bool) -> None:
        old = node.outputs[0]
        name, dtype, shape = old.name, old.dtype, old.shape
        graph.insert_before(node, new)
        out = new[-1].outputs[0]
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        old.name = None
        if last_keeps_name:
            out.name = name
        else:  # keepdims=0: the pooled 4-D tensor keeps the name, the Reshape to (N, C) is new
            new[0].outputs[0].name, out.name = name, f"{name}_2d"
        out.shape = shape
        for n in new:
            if dtype is not None:  # files without value_info leave the type to shape inference
                n.outputs[0].dtype = dtype
            mark(n, type(self).__name__, replaces=node.op_type)
