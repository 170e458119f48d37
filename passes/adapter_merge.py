"""AdapterMergePass: CoRa adapters merged into their Conv's integer weight when ONNX Runtime loads
the model, for integer kernels (8-bit activations), instead of running as branch convolutions."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.errors import PlanError
from cora_onnx.npgrid import adapter_factors, merged_grid
from cora_onnx.plan import LayerPlan, Plan

from ._qdq import dequantize_linear, quantize_linear, scale_zero_point
from ._util import add_initializer, int_tensor, mark

__all__ = ["AdapterMergePass", "MERGED_BITS_KEY"]

MERGED_BITS_KEY = "cora_onnx.merged_bits"  # on the QuantizeLinear: the merged grid's width


class AdapterMergePass(ir.passes.InPlacePass):
    """For every plan layer with an adapter, replace its Conv's weight DequantizeLinear(grid) (made
    by WeightQDQPass: run after it) with

        DequantizeLinear(QuantizeLinear(Cast(grid) * scale + Reshape(MatMul(B, A)), s), s)

    where the factors A, B are Cast(integer grid) * scale when quantized, and s (per output
    channel) puts W_q + B A on a symmetric `bits`-bit grid (bits: the CPU's integer weight width, 7
    or 8). Every input is an initializer: ONNX Runtime's constant folding turns the expression into
    one INT8 weight when the session loads, and its QDQ fusion makes the Conv an integer kernel.
    The file keeps the low-bit grid and the small factors; the running model has no branch.
    Names: `<layer>.adapter_merge_*`. The QuantizeLinear carries the rank and adapter bytes (for
    `inspect`) and MERGED_BITS_KEY (for ActivationQDQPass)."""

    def __init__(self, plan: Plan, bits: int) -> None:
        super().__init__()
        if bits not in (7, 8):
            raise ValueError(f"merged grids are 7 or 8 bits, got {bits}")
        self.layers = [layer for layer in plan.layers if layer.adapter is not None]
        self.bits = bits

    @staticmethod
    def _convs_by_layer(graph: ir.Graph) -> dict[str, list[ir.Node]]:
        """Layer name -> the Convs whose weight is a DequantizeLinear that WeightQDQPass marked."""
        out: dict[str, list[ir.Node]] = {}
        for n in graph:
            w = n.inputs[1] if n.op_type == "Conv" and len(n.inputs) > 1 else None
            p = w.producer() if w is not None else None
            if p is not None and p.op_type == "DequantizeLinear" and "cora_onnx.layer" in p.metadata_props:
                out.setdefault(p.metadata_props["cora_onnx.layer"], []).append(n)
        return out

    def _weight_dq(self, convs: list[ir.Node], layer: LayerPlan) -> tuple[ir.Node, ir.Node]:
        if len(convs) != 1 or layer.uniform is None:
            raise PlanError(f"layer {layer.name}: adapter merging needs one Conv with a quantized weight "
                            f"(DequantizeLinear from WeightQDQPass), found {len(convs)}")
        conv = convs[0]
        if conv.attributes.get_int("group", 1) != 1:
            raise PlanError(f"layer {layer.name}: adapters need an ungrouped Conv")
        return conv, conv.inputs[1].producer()

    def _float(self, graph: ir.Graph, name: str, values: np.ndarray, scale: np.ndarray | None,
               bits: int | None) -> tuple[ir.Value, list[ir.Node]]:
        """A float tensor: an initializer, or Cast(integer grid) * scale (no DequantizeLinear, which
        ONNX Runtime does not constant-fold in QDQ models)."""
        if bits is None:
            return add_initializer(graph, name, ir.Tensor(values.astype(np.float32), name=name)), []
        grid = np.rint(values / scale.reshape(-1, 1)).astype(np.int8)
        q = add_initializer(graph, f"{name}_quantized", int_tensor(grid, bits, True, f"{name}_quantized"))
        s = add_initializer(graph, f"{name}_scale", ir.Tensor(scale.reshape(-1, 1).astype(np.float32), name=f"{name}_scale"))
        cast = ir.node("Cast", [q], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_Cast")
        mul = ir.node("Mul", [cast.outputs[0], s], name=f"{name}_Mul")
        return mul.outputs[0], [cast, mul]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        convs = self._convs_by_layer(graph)
        for layer in self.layers:
            conv, dq = self._weight_dq(convs.get(layer.name, []), layer)
            ad = layer.adapter
            name = f"{layer.name}.adapter_merge"
            nodes: list[ir.Node] = []
            # W_q = (Cast(grid) - zero point) * scale, broadcast along the output channels
            u = layer.uniform
            bshape = (-1,) + (1,) * (len(layer.shape) - 1)
            w = ir.node("Cast", [dq.inputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_grid_Cast")
            nodes.append(w)
            wq = w.outputs[0]
            zp = np.asarray(u.zero_point, np.float32)
            if np.any(zp != 0):
                z = add_initializer(graph, f"{name}_grid_zero", ir.Tensor(zp.reshape(bshape if zp.size > 1 else ()),
                                                                           name=f"{name}_grid_zero"))
                sub = ir.node("Sub", [wq, z], name=f"{name}_grid_Sub")
                nodes.append(sub)
                wq = sub.outputs[0]
            sc = np.asarray(u.scale, np.float32)
            s = add_initializer(graph, f"{name}_grid_scale", ir.Tensor(sc.reshape(bshape if sc.size > 1 else ()),
                                                                        name=f"{name}_grid_scale"))
            mul = ir.node("Mul", [wq, s], name=f"{name}_grid_Mul")
            nodes.append(mul)
            b2, a2 = adapter_factors(layer)
            fb, nb = self._float(graph, f"{name}_b", b2, ad.b_scale, ad.bits)
            fa, na = self._float(graph, f"{name}_a", a2, ad.a_scale, ad.bits)
            mm = ir.node("MatMul", [fb, fa], name=f"{name}_MatMul")
            shape = add_initializer(graph, f"{name}_shape", ir.Tensor(np.array(layer.shape, np.int64), name=f"{name}_shape"))
            rs = ir.node("Reshape", [mm.outputs[0], shape], name=f"{name}_Reshape")
            add = ir.node("Add", [mul.outputs[0], rs.outputs[0]], name=f"{name}_Add")
            _, scale = merged_grid(layer, self.bits)
            s7, z7 = scale_zero_point(graph, name, scale, np.zeros(scale.shape, np.int8))
            q = quantize_linear(add.outputs[0], s7, z7, name, ir.DataType.INT8, layer.shape, axis=0)
            new_dq = dequantize_linear(q.outputs[0], s7, z7, name, layer.shape, axis=0)
            out = new_dq.outputs[0]
            for node in (*nodes, *nb, *na, mm, rs, add):
                node.outputs[0].dtype = ir.DataType.FLOAT
                node.outputs[0].name = f"{node.name}_output"
            facts = dict(layer=layer.name, rank=ad.rank, adapter_bytes=(ad.bits or 32) * ad.params // 8,
                         bits=self.bits, merged="at load")
            mark(q, type(self).__name__, **facts)
            q.metadata_props[MERGED_BITS_KEY] = str(self.bits)
            mark(new_dq, type(self).__name__, layer=layer.name, bits=self.bits, granularity="per_channel")
            graph.insert_before(conv, [*nodes, *nb, *na, mm, rs, add, q, new_dq])
            conv.replace_input_with(1, out)
            if not list(dq.outputs[0].uses()):
                graph.remove(dq, safe=True)
        return ir.passes.PassResult(model, bool(self.layers))
