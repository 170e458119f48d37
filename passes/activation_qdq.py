"""ActivationQDQPass: static 8-bit activation quantization placed so that ONNX Runtime fuses
every quantized Conv / Gemm / MatMul / Add into an integer kernel (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd).

Which tensors get QuantizeLinear -> DequantizeLinear, which compute nodes become integer and
which activations are absorbed is decided by `passes.activation_layout` (shared with
calibration); this pass writes that layout into the graph and prepares the weights:

- weights: an integer grid in another container (INT4) is Cast to INT8 in the graph (the file
  keeps the packed grid; ONNX Runtime folds the Cast at load); a 2-3-bit grid packed in bytes
  (passes._packing) is already decoded to INT8 by a constant subgraph ONNX Runtime folds at
  load; a grid whose values do not fit the scheme (8-bit values where 7-bit weights are needed)
  leaves the node float (logged);
  the weights re-quantized at load (AdapterMergePass, GroupScaleMergePass) are integer weights
  too; a weight with group-wise scales left as WeightQDQPass wrote it (blocked DequantizeLinear,
  Reshape) keeps its node float (logged: integer kernels take one scale per output channel); float weights are quantized per channel here (numpy MSE grid); biases
  become INT32 with scale = input scale x weight scale.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.npgrid import quantize_symmetric

from ._packing import grid_of
from ._qdq import dequantize_linear, dequantized_weight, quantize_linear, scale_zero_point
from ._util import add_initializer, default_opset, mark
from .activation_layout import (ACTIVATION_OPS, WEIGHT_INPUT, QuantScheme, activation_layout, activation_qparams,
                                const_array, requantized, weight_dequantize, weight_source)
from .weight_qdq import grouped_weight_dq

__all__ = ["ActivationQDQPass"]

log = logging.getLogger(__name__)


def _zero_channel_scales(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Output channels whose integer weights are all 0 (axis 0 of q) get scale 1: the dequantized
    weight is 0 either way, and the INT32 bias scale (input x weight scale) stays usable."""
    scale = np.asarray(scale, np.float32).copy()
    if scale.size > 1:
        zero = ~np.any(q.reshape(q.shape[0], -1) != 0, axis=1)
        scale[zero] = np.maximum(scale[zero], 1.0)
    return scale


class ActivationQDQPass(ir.passes.InPlacePass):
    """Insert activation QuantizeLinear -> DequantizeLinear pairs (see the module doc).

    ranges: tensor name -> (low, high) for every tensor of activation_layout(model).calibrate
    (from cora_onnx.onnx.calibrate); scheme: activation type and weight width for the target CPU;
    weight_clip: grid search for float weights quantized here ("mse" or "minmax"; None: by width,
    cora_onnx.core.npgrid.default_clip); merged_bits:
    the width of the weights re-quantized at load (AdapterMergePass, GroupScaleMergePass: 7 or 8;
    None: the scheme's width, what the plan pipeline writes for it). A merged width above the
    scheme's leaves its node float. After the pass, `self.report` says which nodes became integer
    and which stayed float."""

    def __init__(self, ranges: Mapping[str, tuple[float, float]], scheme: QuantScheme = QuantScheme(),
                 weight_clip: str | None = None, merged_bits: int | None = None) -> None:
        super().__init__()
        self.ranges = dict(ranges)
        self.scheme = scheme
        self.weight_clip = weight_clip
        self.merged_bits = scheme.weight_bits if merged_bits is None else merged_bits
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
        for n in graph:  # group-wise weight scales not re-quantized per channel (GroupScaleMergePass does)
            idx = WEIGHT_INPUT.get(n.op_type)
            if idx is not None and len(n.inputs) > idx and grouped_weight_dq(n.inputs[idx]) is not None:
                floating.append(n.name)
        if floating:
            log.warning("%d nodes (e.g. %s) have weights with group-wise scales, which have no integer kernel (they "
                        "need one scale per output channel: GroupScaleMergePass re-quantizes them at load, the merged "
                        "adapter layout); left float", len(floating), floating[0])
        # weights and biases first (they need the input scale of each compute node)
        for name in layout.compute:
            node = nodes[name]
            if node.op_type in ACTIVATION_OPS:
                integer.append(name)
                continue
            x = node.inputs[0].name
            w_scale = self._prepare_weight(graph, node)
            if w_scale is None:
                floating.append(name)
                continue
            if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
                w_scale = self._fit_bias(graph, node, qparams[x][0], w_scale)
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
            s, z = scale_zero_point(graph, tname, scale, np.array(zp, dtype=np_dtype))
            q = quantize_linear(target, s, z, tname, dtype, target.shape)
            dq = dequantize_linear(q.outputs[0], s, z, tname, target.shape)
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
        idx = WEIGHT_INPUT[node.op_type]
        w = node.inputs[idx]
        wmin, wmax = self.scheme.weight_range
        if weight_source(node) == "float":
            arr = w.const_value.numpy()
            # output channels: Conv axis 0, Gemm axis 0 with transB else 1, MatMul axis 1
            per_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)) else 1
            mat = np.moveaxis(arr, per_axis, 0)
            q, scale = quantize_symmetric(mat, self.scheme.weight_bits, clip=self.weight_clip)
            scale = _zero_channel_scales(q, scale)
            q = np.ascontiguousarray(np.moveaxis(q, 0, per_axis))
            base = w.name
            qv = add_initializer(graph, f"{base}_quantized", ir.Tensor(q, name=f"{base}_quantized"))
            dq = dequantized_weight(graph, base, qv, scale, np.zeros(scale.shape, np.int8), w.shape, axis=per_axis)
            mark(dq, type(self).__name__, layer=base, bits=self.scheme.weight_bits, granularity="per_channel")
            graph.insert_before(node, dq)
            w.replace_all_uses_with(dq.outputs[0])
            if not list(w.uses()) and w.name in graph.initializers:
                del graph.initializers[w.name]
            return scale
        dq = weight_dequantize(node)
        transposed = dq is not w.producer()  # a MatMul reading Transpose(DequantizeLinear): (out, in) grid
        if requantized(dq):  # symmetric, zero channels at scale 1, values within +-(2^(bits-1) - 1)
            if self.merged_bits > self.scheme.weight_bits:
                log.warning("%s: merged %d-bit weight grid does not fit the %d-bit weights this CPU needs; "
                            "left as a float kernel", node.name, self.merged_bits, self.scheme.weight_bits)
                return None
            return np.asarray(const_array(dq.inputs[1]), dtype=np.float32)
        if dq.attributes.get("block_size") is not None and dq.attributes.get_int("block_size", 0) != 0:
            log.warning("%s: blocked weight quantization has no integer conv kernel; left float", node.name)
            return None
        qv = dq.inputs[0]
        qarr = np.asarray(grid_of(qv)).astype(np.int16)
        zarr = np.asarray(const_array(dq.inputs[2])).astype(np.int16) if len(dq.inputs) > 2 and dq.inputs[2] is not None \
            else np.zeros((), np.int16)
        scale = np.asarray(const_array(dq.inputs[1]), dtype=np.float32)
        axis = dq.attributes.get_int("axis", 1)
        if np.any(zarr != 0):
            log.warning("%s: asymmetric weight grid; left as a float kernel", node.name)
            return None
        if qarr.min() < wmin or qarr.max() > wmax:
            log.warning("%s: weight grid [%d, %d] does not fit the %d-bit weights this CPU needs; left as a float kernel",
                        node.name, qarr.min(), qarr.max(), self.scheme.weight_bits)
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
        seen = 1 - axis % 2 if transposed else axis  # the axis as the node reads the weight
        per_out = (node.op_type == "Conv" and axis == 0) or (node.op_type == "Gemm" and (
            axis == 0) == bool(node.attributes.get_int("transB", 0))) or (node.op_type == "MatMul" and seen == 1)
        if scale.size > 1 and not per_out:
            log.warning("%s: weight scale axis %d is not the output channel; left as a float kernel", node.name, axis)
            return None
        return scale.reshape(-1)

    def _fit_bias(self, graph: ir.Graph, node: ir.Node, in_scale: float, w_scale: np.ndarray) -> np.ndarray:
        """The weight scales with which the node's bias fits INT32 at scale input x weight with room
        for the accumulator (|sum of products| <= K x 255 x 128, K weights per output channel), so
        ONNX Runtime's INT32 addition cannot overflow. A channel whose scale is too small (its
        weights next to nothing, e.g. a BatchNorm channel folded with gamma ~ 0) is re-quantized at
        the smallest scale that fits, as ONNX Runtime's quantize_static does; its weights change by
        less than one old grid step x 127. The grid must be an INT8 initializer used only here;
        otherwise the scales stay (and _quantize_bias clips, with a warning)."""
        bias = const_array(node.inputs[2])
        dq = weight_dequantize(node)
        w_scale = np.asarray(w_scale, np.float32).reshape(-1)
        if bias is None or dq is None or w_scale.size != np.size(bias):
            return w_scale
        qv = dq.inputs[0]
        k = int(np.prod(qv.shape)) // max(int(w_scale.size), 1) if qv.shape is not None else 0
        limit = float(2 ** 31 - 1 - k * 255 * 128)
        need = (np.abs(bias.astype(np.float64)) / (float(in_scale) * limit)).astype(np.float32)
        low = w_scale.astype(np.float64) < need
        if not np.any(low):
            return w_scale
        axis = dq.attributes.get_int("axis", 1)
        scale_v = dq.inputs[1]
        if limit <= 0 or qv.const_value is None or qv.dtype != ir.DataType.INT8 or len(list(qv.uses())) != 1 \
                or scale_v is None or scale_v.const_value is None or scale_v.const_value.numpy().size != w_scale.size:
            return w_scale
        q = np.moveaxis(qv.const_value.numpy().astype(np.float64), axis, 0).copy()
        new_s = w_scale.copy()
        new_s[low] = np.nextafter(need[low], np.float32(np.inf))
        ratio = (w_scale[low].astype(np.float64) / new_s[low].astype(np.float64)).reshape((-1,) + (1,) * (q.ndim - 1))
        q[low] = np.clip(np.round(q[low] * ratio), -127, 127)
        grid = np.ascontiguousarray(np.moveaxis(q, 0, axis)).astype(np.int8)
        gv = add_initializer(graph, f"{qv.name}_bias_fit", ir.Tensor(grid, name=f"{qv.name}_bias_fit"))
        sv = add_initializer(graph, f"{qv.name}_scale_bias_fit",
                             ir.Tensor(new_s.reshape(scale_v.const_value.numpy().shape), name=f"{qv.name}_scale_bias_fit"))
        dq.replace_input_with(0, gv)
        dq.replace_input_with(1, sv)
        for old in (qv, scale_v):
            if not list(old.uses()) and old.name in graph.initializers:
                del graph.initializers[old.name]
        mark(dq, dq.metadata_props.get("cora_onnx.pass", type(self).__name__),
             **{"bias_fit_channels": int(low.sum()), "restored_by": type(self).__name__})
        return new_s

    def _quantize_bias(self, graph: ir.Graph, node: ir.Node, bias_scale: np.ndarray) -> None:
        b = node.inputs[2]
        arr = const_array(b)
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
        dq = dequantized_weight(graph, base, qv, bias_scale, np.zeros(q.shape, np.int32), b.shape, axis=0)
        mark(dq, type(self).__name__, layer=node.name, bits=32)
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
