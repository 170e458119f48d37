"""Small onnx_ir helpers shared by the passes (no torch here, ever)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError

__all__ = ["PROVENANCE_KEY", "mark", "default_opset", "add_initializer", "shared_const", "int_tensor",
           "require_weights", "planned_weight", "check_fingerprint", "bias_adds"]

PROVENANCE_KEY = "cora_onnx.pass"


def mark(node: ir.Node, pass_name: str, **facts: object) -> ir.Node:
    """Record in node.metadata_props which pass made the node and the facts `inspect` shows."""
    node.metadata_props[PROVENANCE_KEY] = pass_name
    for key, value in facts.items():
        node.metadata_props[f"cora_onnx.{key}"] = str(value)
    return node


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register a new initializer value; the name must be free."""
    if name in graph.initializers:
        raise ValueError(f"initializer {name} already exists")
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def shared_const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    """A small constant shared by every node that needs the same value: the initializer `name`
    (the caller names it by its value), added on first use."""
    if name in graph.initializers:
        return graph.initializers[name]
    return add_initializer(graph, name, ir.Tensor(arr, name=name))


def int_tensor(values: np.ndarray, bits: int, signed: bool, name: str) -> ir.Tensor:
    """Integer tensor in the smallest ONNX container for `bits`: packed INT4/UINT4 (2 per byte)
    for 4 bits and fewer, INT8/UINT8 otherwise."""
    import ml_dtypes  # shipped with onnx_ir

    if bits <= 4:
        arr = values.astype(np.int8 if signed else np.uint8).astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
        return ir.Tensor(arr, dtype=ir.DataType.INT4 if signed else ir.DataType.UINT4, name=name)
    arr = values.astype(np.int8 if signed else np.uint8)
    return ir.Tensor(arr, name=name)


def require_weights(model: ir.Model, layers) -> None:
    """PlanError unless every planned layer's weight is an initializer of the model."""
    missing = [layer.weight for layer in layers if layer.weight not in model.graph.initializers]
    if missing:
        raise PlanError(f"plan does not fit the ONNX model: no initializer named {', '.join(missing[:5])}"
                        + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))


def check_fingerprint(value: ir.Value, layer) -> None:
    """PlanError unless the initializer `value` still holds the float weight `layer` was planned
    from (its fingerprint). A name is not a proof: the exporter's optimizer may have rewritten the
    weight (e.g. fused a BatchNorm into it). Layers without a fingerprint (older plans) pass."""
    fp = getattr(layer, "fingerprint", None)
    if fp is None:
        return
    tensor = value.const_value
    if tensor is None:
        raise PlanError(f"layer {layer.name}: {value.name} has no constant value to check against the plan")
    why = fp.mismatch(tensor.numpy())
    if why is not None:
        raise PlanError(f"layer {layer.name}: the ONNX initializer {value.name} is not the float weight the plan was "
                        f"made from ({why}); the exporter may have rewritten it (e.g. fused a BatchNorm into it): "
                        f"refusing to replace it")


def planned_weight(graph: ir.Graph, layer) -> tuple[ir.Value, list[ir.Node]]:
    """The weight initializer of a planned layer (shape and fingerprint checked) and the nodes that
    use it."""
    value = graph.initializers[layer.weight]
    if tuple(value.shape) != layer.shape:
        raise PlanError(f"layer {layer.name}: plan shape {layer.shape} differs from ONNX {tuple(value.shape)}")
    check_fingerprint(value, layer)
    return value, [use.node for use in value.uses()]


def bias_adds(consumers: list[ir.Node]) -> list[tuple[ir.Node, int]]:
    """The (Add, input index) pairs that add an initializer to the MatMul after a Transpose of the
    weight: a Linear as the exporter writes it on a tensor of more than two dimensions."""
    out = []
    for t in consumers:
        if t.op_type != "Transpose":
            continue
        for mm in (u.node for u in t.outputs[0].uses() if u.node.op_type == "MatMul"):
            for u in mm.outputs[0].uses():
                if u.node.op_type == "Add":
                    other = 1 - u.idx
                    if u.node.inputs[other] is not None and u.node.inputs[other].is_initializer():
                        out.append((u.node, other))
    return out
