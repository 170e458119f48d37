"""ActivationQDQPass: static 8-bit activation quantization placed so that ONNX Runtime fuses
every quantized Conv / Gemm / MatMul / Add into an integer kernel (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd).

The layout (which tensors get QuantizeLinear -> DequantizeLinear) is computed from the graph by
`activation_layout`, so calibration (cora_onnx.calibrate) and the pass agree on the tensor names:

- compute nodes: Conv, Gemm, MatMul whose weight is a DequantizeLinear of an integer
  initializer or a float initializer, and Add of two activations;
- every activation input and the output of a compute node is quantized (except a Gemm/MatMul
  output that is a graph output: ORT fuses those with float output); a Relu, or a Clip with
  min 0, that is the only consumer of a compute output is absorbed: the QuantizeLinear of the
  compute output takes the activation's range (lower bound 0), whose clamp is the activation
  (exact), and the activation node is removed (what ORT's own QDQ tooling does too);
- MaxPool, Pad (constant 0), Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity outputs
  share their input's scale and zero point, so ORT drops their Q/DQ and runs them on 8-bit data;
- weights: an integer grid in another container (INT4) is Cast to INT8 in the graph (the file
  keeps the packed grid; ONNX Runtime folds the Cast at load); a 2-3-bit grid packed in bytes
  (passes._packing) is already decoded to INT8 by a constant subgraph ONNX Runtime folds at
  load; a grid whose values do not fit the scheme (8-bit values where 7-bit weights are needed)
  leaves the node float (logged);
  AdapterFoldPass's folded weights are integer weights too; float weights are quantized per
  channel here (numpy MSE grid); biases become INT32 with scale = input scale x weight scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_ir as ir

from cora_onnx.errors import PlanError
from cora_onnx.npgrid import quantize_symmetric

from ._packing import grid_of, is_grid
from ._util import add_initializer, default_opset, mark
from .adapter_fold import FOLDED_BITS_KEY

__all__ = ["ActivationQDQPass", "QuantScheme", "ActivationLayout", "activation_layout", "activation_qparams",
           "COMPUTE_OPS", "SHARE_OPS"]

log = logging.getLogger(__name__)

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "Add")
SHARE_OPS = ("MaxPool", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}


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


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None


def _weight_source(node: ir.Node) -> str | None:
    """'dq' when the weight is DequantizeLinear(integer initializer), 'float' for a float
    initializer, None otherwise (then the node is not a compute node)."""
    idx = _WEIGHT_INPUT[node.op_type]
    if len(node.inputs) <= idx or node.inputs[idx] is None:
        return None
    w = node.inputs[idx]
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    p = w.producer()
    if p is not None and p.op_type == "DequantizeLinear" and p.inputs[0] is not None \
            and (is_grid(p.inputs[0]) or _folded_bits(p) is not None):
        return "dq"
    if w.const_value is not None and w.dtype == ir.DataType.FLOAT and (node.op_type != "MatMul" or len(w.shape) == 2):
        return "float"
    return None


def _folded_bits(dq: ir.Node) -> int | None:
    """The grid width of a weight DequantizeLinear(QuantizeLinear(constant expression)) written
    by AdapterFoldPass (folded by ONNX Runtime at load), else None."""
    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
    if q is None or q.op_type != "QuantizeLinear" or FOLDED_BITS_KEY not in q.metadata_props:
        return None
    return int(q.metadata_props[FOLDED_BITS_KEY])


def _constant_outputs(graph: ir.Graph) -> set[int]:
    """ids of the node outputs computed from initializers and Constants alone (e.g. the weight
    expression of AdapterFoldPass, which ONNX Runtime folds at load): one pass in graph order."""
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
        if node.op_type == "Add":
            if len(node.inputs) == 2 and all(_is_activation(v, constants) for v in node.inputs):
                out.append(node)
        elif _weight_source(node) is not None and _is_activation(node.inputs[0], constants):
            out.append(node)
    return out


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
        lo = _const(act.inputs[1]) if len(act.inputs) > 1 else None
        return act if lo is not None and float(lo) == 0.0 else None
    return None


def _zero_channel_scales(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Output channels whose integer weights are all 0 (axis 0 of q) get scale 1: the dequantized
    weight is 0 either way, and the INT32 bias scale (input x weight scale) stays usable."""
    scale = np.asarray(scale, np.float32).copy()
    if scale.size > 1:
        zero = ~np.any(q.reshape(q.shape[0], -1) != 0, axis=1)
        scale[zero] = np.maximum(scale[zero], 1.0)
    return scale


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
        for v in (node.inputs if node.op_type == "Add" else node.inputs[:1]):
            want(v)
        out = node.outputs[0]
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
            cval = _const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else np.zeros(())
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


class ActivationQDQPass(ir.passes.InPlacePass):
    """Insert activation QuantizeLinear -> DequantizeLinear pairs (see the module doc).

    ranges: tensor name -> (low, high) for every tensor of activation_layout(model).calibrate
    (from cora_onnx.calibrate); scheme: activation type and weight width for the target CPU;
    weight_clip: grid search for float weights quantized here ("mse" or "minmax").
    After the pass, `self.report` says which nodes became integer and which stayed float."""

    def __init__(self, ranges: Mapping[str, tuple[float, float]], scheme: QuantScheme = QuantScheme(),
                 weight_clip: str = "mse") -> None:
        super().__init__()
        self.ranges = dict(ranges)
        self.scheme = scheme
        self.weight_clip = weight_clip
        self.report: dict = {}

    def requires(self, model: ir.Model) -> None:
        if default_opset(model) < 13:
            raise ir.passes.PreconditionError(
                f"ActivationQDQPass needs opset >= 13 (per-channel DequantizeLinear), the model has {default_opset(model)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layout = activation_layout(model)
        missing = [t for t in layout.calibrate if t not in self.ranges]
        if missing:
            raise PlanError(f"no calibrated range for {len(missing)} tensors, e.g. {missing[0]}")
        qparams = activation_qparams(self.ranges, self.scheme, layout)
        nodes = {n.name: n for n in graph}
        integer, floating = [], []
        # weights and biases first (they need the input scale of each compute node)
        for name in layout.compute:
            node = nodes[name]
            if node.op_type == "Add":
                integer.append(name)
                continue
            x = node.inputs[0].name
            w_scale = self._prepare_weight(graph, node)
            if w_scale is None:
                floating.append(name)
                continue
            if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
                self._quantize_bias(graph, node, qparams[x][0] * w_scale)
            integer.append(name)
        by_name = {v.name: v for n in graph for v in n.outputs}
        by_name.update({v.name: v for v in graph.inputs})
        act_of = {a: c for c, a in layout.absorbed.items()}
        dtype = ir.DataType.UINT8 if self.scheme.act_dtype == "uint8" else ir.DataType.INT8
        np_dtype = np.uint8 if self.scheme.act_dtype == "uint8" else np.int8
        for tname in layout.quantized:
            scale, zp = qparams[tname]
            target = by_name[tname]
            absorbed_node = None
            if tname in act_of:  # quantize the compute output with the activation's range
                absorbed_node = target.producer()
                target = by_name[act_of[tname]]
            s = add_initializer(graph, f"{tname}_scale", ir.Tensor(np.array(scale, dtype=np.float32), name=f"{tname}_scale"))
            z = add_initializer(graph, f"{tname}_zero_point", ir.Tensor(np.array(zp, dtype=np_dtype),
                                                                         name=f"{tname}_zero_point"))
            q = ir.node("QuantizeLinear", [target, s, z], name=f"{tname}_QuantizeLinear")
            q.outputs[0].name = f"{tname}_quantized"
            q.outputs[0].dtype = dtype
            q.outputs[0].shape = target.shape
            dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{tname}_DequantizeLinear")
            dq.outputs[0].name = f"{tname}_dequantized"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = target.shape
            facts = {"tensor": tname, "scale": f"{scale:.6g}", "zero_point": zp,
                     "shared_with": layout.root(tname) if tname in layout.shared else ""}
            if absorbed_node is not None:
                facts["absorbed"] = absorbed_node.op_type
            for n in (q, dq):
                mark(n, type(self).__name__, **facts)
            old = by_name[tname]  # the value whose uses move to the DQ output
            uses = [(u.node, u.idx) for u in old.uses()]
            producer = target.producer()
            if producer is None:
                graph.insert_before(next(iter(graph)), [q, dq])
            else:
                graph.insert_after(producer, [q, dq])
            for user, idx in uses:
                if user is not q:
                    user.replace_input_with(idx, dq.outputs[0])
            if old.is_graph_output():  # the graph output keeps its name, now the dequantized value
                for i, out in enumerate(graph.outputs):
                    if out is old:
                        name = old.name
                        old.name = f"{name}_prequantized"
                        dq.outputs[0].name = name
                        graph.outputs[i] = dq.outputs[0]
            if absorbed_node is not None:
                graph.remove(absorbed_node, safe=True)
        self.report = {"integer_nodes": integer, "float_nodes": floating,
                       "activation_tensors": len(layout.quantized), "calibrated_tensors": len(layout.calibrate),
                       "absorbed_activations": len(layout.absorbed), "scheme": self.scheme.to_json()}
        return ir.passes.PassResult(model, bool(layout.quantized))

    # -- weights ---------------------------------------------------------------------------
    def _prepare_weight(self, graph: ir.Graph, node: ir.Node) -> np.ndarray | None:
        """Make the weight a DequantizeLinear of an INT8 container within the scheme's range;
        return its per-output-channel scale (broadcastable to the bias), or None to stay float."""
        idx = _WEIGHT_INPUT[node.op_type]
        w = node.inputs[idx]
        wmin, wmax = self.scheme.weight_range
        if _weight_source(node) == "float":
            arr = w.const_value.numpy()
            # output channels: Conv axis 0, Gemm axis 0 with transB else 1, MatMul axis 1
            per_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)) else 1
            mat = np.moveaxis(arr, per_axis, 0)
            q, scale = quantize_symmetric(mat, self.scheme.weight_bits, clip=self.weight_clip)
            scale = _zero_channel_scales(q, scale)
            q = np.ascontiguousarray(np.moveaxis(q, 0, per_axis))
            base = w.name
            qv = add_initializer(graph, f"{base}_quantized", ir.Tensor(q, name=f"{base}_quantized"))
            sv = add_initializer(graph, f"{base}_scale", ir.Tensor(scale, name=f"{base}_scale"))
            zv = add_initializer(graph, f"{base}_zero_point", ir.Tensor(np.zeros(scale.shape, np.int8),
                                                                         name=f"{base}_zero_point"))
            dq = ir.node("DequantizeLinear", [qv, sv, zv], attributes={"axis": per_axis}, name=f"{base}_DequantizeLinear")
            dq.outputs[0].name = f"{base}_dequantized"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = w.shape
            mark(dq, type(self).__name__, layer=base, bits=self.scheme.weight_bits, granularity="per_channel")
            graph.insert_before(node, dq)
            w.replace_all_uses_with(dq.outputs[0])
            if not list(w.uses()) and w.name in graph.initializers:
                del graph.initializers[w.name]
            return scale
        dq = w.producer()
        folded = _folded_bits(dq)
        if folded is not None:  # symmetric, zero channels at scale 1, values within +-(2^(bits-1) - 1)
            if folded > self.scheme.weight_bits:
                log.warning("%s: folded %d-bit weight grid does not fit the %d-bit weights this CPU needs; "
                            "left as a float kernel", node.name, folded, self.scheme.weight_bits)
                return None
            return np.asarray(_const(dq.inputs[1]), dtype=np.float32)
        qv = dq.inputs[0]
        qarr = np.asarray(grid_of(qv)).astype(np.int16)
        zarr = np.asarray(_const(dq.inputs[2])).astype(np.int16) if len(dq.inputs) > 2 and dq.inputs[2] is not None \
            else np.zeros((), np.int16)
        scale = np.asarray(_const(dq.inputs[1]), dtype=np.float32)
        axis = dq.attributes.get_int("axis", 1)
        if np.any(zarr != 0):
            log.warning("%s: asymmetric weight grid; left as a float kernel", node.name)
            return None
        if qarr.min() < wmin or qarr.max() > wmax:
            log.warning("%s: weight grid [%d, %d] does not fit the %d-bit weights this CPU needs; left as a float kernel",
                        node.name, qarr.min(), qarr.max(), self.scheme.weight_bits)
            return None
        if dq.attributes.get("block_size") is not None and dq.attributes.get_int("block_size", 0) != 0:
            log.warning("%s: blocked weight quantization has no integer conv kernel; left float", node.name)
            return None
        if qv.dtype != ir.DataType.INT8 or (dq.inputs[2] is not None and dq.inputs[2].dtype != ir.DataType.INT8):
            # ORT's integer conv kernels need an INT8 grid: a Cast from the stored container (INT4
            # stays packed in the file; ORT constant-folds the Cast when the session loads)
            users = [(u.node, u.idx) for u in qv.uses() if u.node.op_type == "DequantizeLinear"]
            cast = ir.node("Cast", [qv], attributes={"to": ir.DataType.INT8}, name=f"{qv.name}_Cast_int8")
            cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = f"{qv.name}_int8", ir.DataType.INT8, qv.shape
            new_z = add_initializer(graph, f"{qv.name}_int8_zero_point",
                                    ir.Tensor(zarr.astype(np.int8).reshape(scale.shape), name=f"{qv.name}_int8_zero_point"))
            graph.insert_before(dq, cast)
            for user, i in users:
                user.replace_input_with(i, cast.outputs[0])
                if len(user.inputs) < 3:
                    user.resize_inputs(3)
                user.replace_input_with(2, new_z)
            mark(dq, dq.metadata_props.get("cora_onnx.pass", type(self).__name__),
                 **{"container": "int8 (Cast at load)", "restored_by": type(self).__name__})
        fixed = _zero_channel_scales(np.moveaxis(qarr, axis, 0), scale.reshape(-1)) if scale.size > 1 else scale
        if not np.array_equal(fixed.reshape(scale.shape), scale):
            new_s = add_initializer(graph, f"{qv.name}_scale_int8", ir.Tensor(fixed.reshape(scale.shape).astype(np.float32),
                                                                              name=f"{qv.name}_scale_int8"))
            dq.replace_input_with(1, new_s)
            scale = fixed.reshape(scale.shape)
        per_out = (node.op_type == "Conv" and axis == 0) or (node.op_type == "Gemm" and (
            axis == 0) == bool(node.attributes.get_int("transB", 0))) or (node.op_type == "MatMul" and axis == 1)
        if scale.size > 1 and not per_out:
            log.warning("%s: weight scale axis %d is not the output channel; left as a float kernel", node.name, axis)
            return None
        return scale.reshape(-1)

    def _quantize_bias(self, graph: ir.Graph, node: ir.Node, bias_scale: np.ndarray) -> None:
        b = node.inputs[2]
        arr = _const(b)
        if arr is None or b.dtype != ir.DataType.FLOAT:
            return
        bias_scale = np.broadcast_to(np.asarray(bias_scale, np.float32), arr.shape).astype(np.float32)
        bias_scale = np.maximum(bias_scale, np.finfo(np.float32).tiny)
        q64 = np.round(arr.astype(np.float64) / bias_scale.astype(np.float64))
        if np.any(np.abs(q64) > 2 ** 31 - 1):
            log.warning("%s: bias does not fit INT32 at scale input x weight; clipped", node.name)
        q = np.clip(q64, -(2 ** 31 - 1), 2 ** 31 - 1).astype(np.int32)
        base = f"{b.name}_int32"
        i = 1
        while f"{base}_quantized" in graph.initializers:
            base, i = f"{b.name}_int32_{i}", i + 1
        qv = add_initializer(graph, f"{base}_quantized", ir.Tensor(q, name=f"{base}_quantized"))
        sv = add_initializer(graph, f"{base}_scale", ir.Tensor(bias_scale, name=f"{base}_scale"))
        zv = add_initializer(graph, f"{base}_zero_point", ir.Tensor(np.zeros(q.shape, np.int32), name=f"{base}_zero_point"))
        dq = ir.node("DequantizeLinear", [qv, sv, zv], attributes={"axis": 0}, name=f"{base}_DequantizeLinear")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = b.shape
        mark(dq, type(self).__name__, layer=node.name, bits=32)
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
