"""Which tensors of a graph get activation QuantizeLinear -> DequantizeLinear, and with which
scale and zero point: the layout that `ActivationQDQPass` writes and that calibration
(cora_onnx.onnx.int8 / cora_onnx.onnx.calibrate) measures, computed here once so both agree on the tensor
names. Pure graph analysis on onnx_ir: nothing here changes a model.

- compute nodes: Conv, Gemm, MatMul whose weight is a DequantizeLinear of an integer
  initializer (or of a grid decoded by passes._packing, or of a QuantizeLinear of a constant
  expression: the re-quantized weights of AdapterMergePass and GroupScaleMergePass) or a float
  initializer; Add and Mul of two activations; Concat of activations; GlobalAveragePool,
  AveragePool, Sigmoid and LeakyRelu of an activation (the ops ONNX Runtime's CPU provider runs as
  QLinear* kernels when a DequantizeLinear feeds each input and a QuantizeLinear takes the output;
  their outputs get their own calibrated range);
- every activation input and the output of a compute node is quantized (except a Gemm/MatMul
  output that is a graph output: ORT fuses those with float output); a Relu, or a Clip with
  min 0, that is the only consumer of a compute output is absorbed: the QuantizeLinear of the
  compute output takes the activation's range (lower bound 0), whose clamp is the activation
  (exact), and the pass removes the activation node (what ORT's own QDQ tooling does too);
- MaxPool, Pad (constant 0), Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity outputs
  share their input's scale and zero point, so ORT drops their Q/DQ and runs them on 8-bit data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_ir as ir

from ._packing import is_grid

__all__ = ["QuantScheme", "ActivationLayout", "activation_layout", "activation_qparams", "COMPUTE_OPS",
           "ACTIVATION_OPS", "SHARE_OPS", "WEIGHT_INPUT", "const_array", "weight_source", "weight_dequantize", "requantized"]

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid",
               "LeakyRelu")
ACTIVATION_OPS = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu")  # no weight
SHARE_OPS = ("MaxPool", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class QuantScheme:
    """act_dtype: "uint8" or "int8" activations (asymmetric); weight_bits: 8, or 7 for
    reduce_range (u8 x s8 products saturate on AVX2 without VNNI); reason: why it was chosen."""

    act_dtype: str = "uint8"
    weight_bits: int = 8
    reason: str = ""

    def __post_init__(self) -> None:
        if self.act_dtype not in ("uint8", "int8"):
            raise ValueError(f"act_dtype must be uint8 or int8, got {self.act_dtype!r}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {self.weight_bits}")

    @property
    def act_range(self) -> tuple[int, int]:
        return (0, 255) if self.act_dtype == "uint8" else (-128, 127)

    @property
    def weight_range(self) -> tuple[int, int]:
        return -(1 << (self.weight_bits - 1)), (1 << (self.weight_bits - 1)) - 1

    def to_json(self) -> dict:
        return {"act_dtype": self.act_dtype, "weight_bits": self.weight_bits, "reduce_range": self.weight_bits == 7,
                "reason": self.reason}


@dataclass
class ActivationLayout:
    """calibrate: tensors whose range is measured (names in the graph before the pass);
    shared: tensor -> tensor whose parameters it reuses; absorbed: compute output -> output of the
    Relu/Clip absorbed into its quantization; compute: names of the nodes that become integer."""

    calibrate: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    absorbed: dict[str, str] = field(default_factory=dict)
    compute: list[str] = field(default_factory=list)

    def root(self, name: str) -> str:
        while name in self.shared:
            name = self.shared[name]
        return name

    @property
    def quantized(self) -> list[str]:
        """Every tensor that carries a Q/DQ pair (before absorption), calibrated or shared."""
        return list(self.calibrate) + [t for t in self.shared if t not in self.calibrate]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None


def weight_source(node: ir.Node) -> str | None:
    """'dq' when the weight is DequantizeLinear(integer initializer), 'float' for a float
    initializer, None otherwise (then the node is not a compute node)."""
    idx = WEIGHT_INPUT[node.op_type]
    if len(node.inputs) <= idx or node.inputs[idx] is None:
        return None
    w = node.inputs[idx]
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    p = weight_dequantize(node)
    if p is not None and p.inputs[0] is not None and (is_grid(p.inputs[0]) or requantized(p)):
        return "dq"
    if w.const_value is not None and w.dtype == ir.DataType.FLOAT and (node.op_type != "MatMul" or len(w.shape) == 2):
        return "float"
    return None


def weight_dequantize(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear that writes a compute node's weight: its producer, or for a MatMul the
    producer of a 2-D Transpose(perm [1, 0]) between them (a Linear's (out, in) weight as
    passes.WeightNamesPass writes it; ONNX Runtime moves the Transpose onto the constant)."""
    idx = WEIGHT_INPUT[node.op_type]
    p = node.inputs[idx].producer() if len(node.inputs) > idx and node.inputs[idx] is not None else None
    if p is not None and node.op_type == "MatMul" and p.op_type == "Transpose" and p.domain in ("", "ai.onnx") \
            and list(p.attributes.get_ints("perm", [])) == [1, 0] and len(p.inputs[0].uses()) == 1:
        p = p.inputs[0].producer()
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def requantized(dq: ir.Node) -> bool:
    """Whether a DequantizeLinear reads QuantizeLinear(a constant expression): a weight written as
    an expression that ONNX Runtime folds at load and re-quantizes (AdapterMergePass,
    GroupScaleMergePass). Recognised by its structure, not by metadata."""
    q = dq.inputs[0].producer() if dq.inputs and dq.inputs[0] is not None else None
    return q is not None and q.op_type == "QuantizeLinear" and _is_constant(q.inputs[0])


def _is_constant(value: ir.Value | None, depth: int = 0) -> bool:
    """Computed from initializers and Constants alone (a short expression: depth at most 32)."""
    if value is None or value.const_value is not None:
        return value is not None
    p = value.producer()
    if p is None or depth > 32:
        return False
    return all(v is None or _is_constant(v, depth + 1) for v in p.inputs)


def _constant_outputs(graph: ir.Graph) -> set[int]:
    """ids of the node outputs computed from initializers and Constants alone (e.g. the weight
    expression of AdapterMergePass, which ONNX Runtime folds at load): one pass in graph order."""
    const: set[int] = set()
    for node in graph:
        if all(v is None or v.const_value is not None or id(v) in const for v in node.inputs):
            const.update(id(v) for v in node.outputs)
    return const


def _is_activation(value: ir.Value, constants: set[int]) -> bool:
    return value is not None and value.const_value is None and id(value) not in constants and value.dtype in (
        ir.DataType.FLOAT, None)


def _compute_nodes(graph: ir.Graph, constants: set[int]) -> list[ir.Node]:
    out = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in COMPUTE_OPS:
            continue
        if node.op_type in ("Add", "Mul"):
            if len(node.inputs) == 2 and all(_is_activation(v, constants) for v in node.inputs):
                out.append(node)
        elif node.op_type == "Concat":
            if node.inputs and all(_is_activation(v, constants) for v in node.inputs):
                out.append(node)
        elif node.op_type in ACTIVATION_OPS:  # unary
            if _is_activation(node.inputs[0], constants):
                out.append(node)
        elif weight_source(node) is not None and _is_activation(node.inputs[0], constants):
            out.append(node)
    return out


def _with_bias(node: ir.Node, constants: set[int]) -> ir.Value:
    """A compute node's output as quantized: for a MatMul whose only consumer adds a constant (a
    Linear exported as MatMul + Add), the sum; ONNX Runtime runs the pair as one integer kernel
    with float output and bias (MatMulIntegerToFloat), as PyTorch computes the Linear."""
    out = node.outputs[0]
    uses = list(out.uses())
    if node.op_type != "MatMul" or len(uses) != 1 or out.is_graph_output():
        return out
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return out
    other = add.inputs[1 - uses[0].idx]
    return add.outputs[0] if other is not None and (other.const_value is not None or id(other) in constants) else out


def _absorbable(value: ir.Value) -> ir.Node | None:
    """The Relu / Clip(min 0) that is the only consumer of value, else None."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    act = uses[0].node
    if act.domain not in ("", "ai.onnx") or act.outputs[0].is_graph_output():
        return None
    if act.op_type == "Relu":
        return act
    if act.op_type == "Clip":
        lo = const_array(act.inputs[1]) if len(act.inputs) > 1 else None
        return act if lo is not None and float(lo) == 0.0 else None
    return None


def activation_layout(model: ir.Model) -> ActivationLayout:
    """Which tensors get activation Q/DQ (see the module doc). Pure graph analysis."""
    graph = model.graph
    layout = ActivationLayout()
    need: list[str] = []
    values: dict[str, ir.Value] = {}

    def want(v: ir.Value) -> None:
        if v.name not in values:
            values[v.name] = v
            need.append(v.name)

    constants = _constant_outputs(graph)
    for node in _compute_nodes(graph, constants):
        layout.compute.append(node.name)
        for v in (node.inputs if node.op_type in ACTIVATION_OPS else node.inputs[:1]):
            want(v)
        out = _with_bias(node, constants)
        if out.is_graph_output() and node.op_type in ("Gemm", "MatMul"):
            continue  # logits stay float: ORT fuses DQ -> Gemm/MatMul into a float-output integer kernel
        act = _absorbable(out)
        if act is not None:
            layout.absorbed[out.name] = act.outputs[0].name
            want(act.outputs[0])
        else:
            want(out)
    # share parameters through data-movement ops (walk producers, transitively)
    i = 0
    while i < len(need):
        v = values[need[i]]
        i += 1
        p = v.producer()
        if p is None or p.domain not in ("", "ai.onnx") or p.op_type not in SHARE_OPS or v.is_graph_output():
            continue
        if p.op_type == "Pad":
            mode = p.attributes.get_string("mode", "constant")
            cval = const_array(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else np.zeros(())
            if mode != "constant" or cval is None or float(np.asarray(cval).reshape(-1)[0]) != 0.0:
                continue
        src = p.inputs[0]
        if src is None or not _is_activation(src, constants):
            continue
        layout.shared[v.name] = src.name
        want(src)
    layout.calibrate = [n for n in need if n not in layout.shared]
    return layout


def activation_qparams(ranges: Mapping[str, tuple[float, float]], scheme: QuantScheme,
                       layout: ActivationLayout) -> dict[str, tuple[float, int]]:
    """Tensor name -> (scale, zero point) for every quantized tensor of layout; the range is
    widened to contain 0 (so zero padding and ReLU are exact)."""
    qmin, qmax = scheme.act_range
    out: dict[str, tuple[float, int]] = {}
    for name in layout.calibrate:
        if name not in ranges:
            raise KeyError(name)
        lo, hi = (float(x) for x in ranges[name])
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = float(np.float32(max(hi - lo, 1e-8) / (qmax - qmin)))
        zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
        out[name] = (scale, zp)
    for name in layout.shared:
        out[name] = out[layout.root(name)]
    return out
