"""AdapterMergePass: CoRa adapters merged into their Conv's integer weight when ONNX Runtime loads
the model, for integer kernels (8-bit activations), instead of running as branch convolutions."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.npgrid import adapter_factors, merged_grid
from cora_onnx.core.plan import LayerPlan, Plan

from ._qdq import dequantize_linear, expand_blocks, quantize_linear, scale_zero_point
from ._util import add_initializer, int_tensor, mark
from .weight_qdq import grouped_weight_dq

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
    `inspect`) and MERGED_BITS_KEY (for ActivationQDQPass).

    A weight with group-wise scales (UniformWeights.group; integer kernels take one scale per
    output channel) is re-quantized the same way, with or without an adapter: W_q is then
    Cast(grid (C_out, K)) * the group scales repeated along K (`_qdq.expand_blocks` on the float16
    scales' Cast), Reshaped to the weight's shape. Such a layer without adapter keeps
    the `adapter_merge` names, with rank 0 in its facts, and may be a Conv or a Gemm/MatMul.

    bits None (float activations): the adapter is merged into the float weight, not re-quantized:
    the Conv reads Add(W_q, Reshape(MatMul(B, A))), W_q being the layer's weight value as
    WeightQDQPass left it (WeightDecodePass, run after, writes it in standard ops). The sum is folded
    into one float weight at load: the running model is a plain Conv, as fast as the float model.
    Only layers with an adapter are touched; the Add (`<layer>.adapter_merge_Add`) carries the facts."""

    def __init__(self, plan: Plan, bits: int | None) -> None:
        super().__init__()
        if bits not in (7, 8, None):
            raise ValueError(f"merged grids are 7 or 8 bits (None: merged in float), got {bits}")
        self.layers = [layer for layer in plan.layers if layer.adapter is not None
                       or (bits is not None and layer.uniform is not None and layer.uniform.group
                           and layer.codebook is None)]
        self.bits = bits

    @staticmethod
    def _convs_by_layer(graph: ir.Graph) -> dict[str, list[ir.Node]]:
        """Layer name -> the Convs whose weight is a DequantizeLinear that WeightQDQPass marked
        (for group-wise scales: the Reshape of it)."""
        out: dict[str, list[ir.Node]] = {}
        for n in graph:
            w = n.inputs[1] if n.op_type == "Conv" and len(n.inputs) > 1 else None
            p = w.producer() if w is not None else None
            p = grouped_weight_dq(w) or p
            if p is not None and p.op_type == "DequantizeLinear" and "cora_onnx.layer" in p.metadata_props:
                out.setdefault(p.metadata_props["cora_onnx.layer"], []).append(n)
        return out

    @staticmethod
    def _grouped_dqs(graph: ir.Graph) -> dict[str, ir.Node]:
        """Layer name -> the blocked DequantizeLinear WeightQDQPass wrote for group-wise scales."""
        return {n.metadata_props["cora_onnx.layer"]: n for n in graph if n.op_type == "DequantizeLinear"
                and n.metadata_props.get("cora_onnx.granularity") == "per_group" and "cora_onnx.layer" in n.metadata_props}

    def _grouped_weight(self, graph: ir.Graph, name: str, dq: ir.Node, layer: LayerPlan) -> list[ir.Node]:
        """Cast(grid) * repeated group scales, Reshaped to the weight's shape (class doc); the last
        node's output is W_q. Float32 products: what DequantizeLinear(block_size) and
        UniformWeights.dequantize compute."""
        u = layer.uniform
        k = u.q.size // u.scale.shape[0]
        s, nodes = expand_blocks(graph, dq.inputs[1], 1, u.group, k, f"{name}_group_scale")

        def add(op: str, inputs: list[ir.Value], suffix: str, **attrs) -> ir.Value:
            node = ir.node(op, inputs, attributes=attrs, name=f"{name}_{suffix}")
            nodes.append(node)
            return node.outputs[0]

        g = add("Cast", [dq.inputs[0]], "grid_Cast", to=ir.DataType.FLOAT)
        wq = add("Mul", [g, s], "grid_Mul")
        add("Reshape", [wq, add_initializer(graph, f"{name}_weight_shape", ir.Tensor(
            np.array(layer.shape, np.int64), name=f"{name}_weight_shape"))], "grid_Reshape")
        return nodes

    def _weight_dq(self, convs: list[ir.Node], layer: LayerPlan) -> tuple[ir.Node, ir.Node]:
        if len(convs) != 1 or layer.uniform is None:
            raise PlanError(f"layer {layer.name}: adapter merging needs one Conv with a quantized weight "
                            f"(DequantizeLinear from WeightQDQPass), found {len(convs)}")
        conv = convs[0]
        if conv.attributes.get_int("group", 1) != 1:
            raise PlanError(f"layer {layer.name}: adapters need an ungrouped Conv")
        return conv, grouped_weight_dq(conv.inputs[1]) or conv.inputs[1].producer()

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

    def _adapter_product(self, graph: ir.Graph, name: str, layer: LayerPlan) -> tuple[ir.Value, list[ir.Node]]:
        """Reshape(MatMul(B, A)) in the weight's shape: the adapter as a weight, and its nodes."""
        ad = layer.adapter
        b2, a2 = adapter_factors(layer)
        fb, nb = self._float(graph, f"{name}_b", b2, ad.b_scale, ad.bits)
        fa, na = self._float(graph, f"{name}_a", a2, ad.a_scale, ad.bits)
        mm = ir.node("MatMul", [fb, fa], name=f"{name}_MatMul")
        shape = add_initializer(graph, f"{name}_shape", ir.Tensor(np.array(layer.shape, np.int64), name=f"{name}_shape"))
        rs = ir.node("Reshape", [mm.outputs[0], shape], name=f"{name}_Reshape")
        return rs.outputs[0], [*nb, *na, mm, rs]

    def _merge_float(self, graph: ir.Graph, convs: dict[str, list[ir.Node]], layer: LayerPlan) -> None:
        conv, dq = self._weight_dq(convs.get(layer.name, []), layer)
        name = f"{layer.name}.adapter_merge"
        ba, nodes = self._adapter_product(graph, name, layer)
        add = ir.node("Add", [conv.inputs[1], ba], name=f"{name}_Add")
        nodes.append(add)
        for node in nodes:
            node.outputs[0].dtype = ir.DataType.FLOAT
            node.outputs[0].name = f"{node.name}_output"
        add.outputs[0].shape = ir.Shape(layer.shape)
        ad = layer.adapter
        mark(add, type(self).__name__, layer=layer.name, rank=ad.rank, adapter_bytes=(ad.bits or 32) * ad.params // 8,
             merged="at load, in float")
        graph.insert_before(conv, nodes)
        conv.replace_input_with(1, add.outputs[0])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        convs = self._convs_by_layer(graph)
        if self.bits is None:
            for layer in self.layers:
                self._merge_float(graph, convs, layer)
            return ir.passes.PassResult(model, bool(self.layers))
        grouped = self._grouped_dqs(graph)
        for layer in self.layers:
            ad = layer.adapter
            u = layer.uniform
            if ad is not None:
                conv, dq = self._weight_dq(convs.get(layer.name, []), layer)
                old_out = conv.inputs[1]
                anchor = old_out.producer()
            else:  # group-wise scales alone: every user of the weight
                dq = grouped.get(layer.name)
                if dq is None:
                    raise PlanError(f"layer {layer.name}: re-quantizing group-wise scales per channel needs the "
                                    f"blocked DequantizeLinear from WeightQDQPass (run it first)")
                conv = None
                old_out = dq.outputs[0]
                rs_users = [use.node for use in old_out.uses() if use.node.op_type == "Reshape"]
                if len(rs_users) == 1:
                    old_out = rs_users[0].outputs[0]
                anchor = old_out.producer()
            name = f"{layer.name}.adapter_merge"
            if u.group:
                if dq.metadata_props.get("cora_onnx.granularity") != "per_group":
                    raise PlanError(f"layer {layer.name}: the plan has group-wise scales but the graph's weight "
                                    f"DequantizeLinear is not the blocked one WeightQDQPass writes for them")
                nodes = self._grouped_weight(graph, name, dq, layer)
                wq_out = nodes[-1].outputs[0]
            else:
                nodes = []
                # W_q = (Cast(grid) - zero point) * scale, broadcast along the output channels
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
                wq_out = mul.outputs[0]
            if ad is not None:
                ba, more = self._adapter_product(graph, name, layer)
                add = ir.node("Add", [wq_out, ba], name=f"{name}_Add")
                nodes += [*more, add]
                wq_out = add.outputs[0]
            _, scale = merged_grid(layer, self.bits)
            s7, z7 = scale_zero_point(graph, name, scale, np.zeros(scale.shape, np.int8))
            q = quantize_linear(wq_out, s7, z7, name, ir.DataType.INT8, layer.shape, axis=0)
            new_dq = dequantize_linear(q.outputs[0], s7, z7, name, layer.shape, axis=0)
            out = new_dq.outputs[0]
            for node in nodes:
                node.outputs[0].dtype = ir.DataType.FLOAT
                node.outputs[0].name = f"{node.name}_output"
            facts = dict(layer=layer.name, rank=ad.rank if ad else 0,
                         adapter_bytes=(ad.bits or 32) * ad.params // 8 if ad else 0, bits=self.bits, merged="at load")
            if u.group:
                facts["from_group"] = u.group
            mark(q, type(self).__name__, **facts)
            q.metadata_props[MERGED_BITS_KEY] = str(self.bits)
            mark(new_dq, type(self).__name__, layer=layer.name, bits=self.bits, granularity="per_channel")
            if conv is not None:
                graph.insert_before(conv, [*nodes, q, new_dq])
                conv.replace_input_with(1, out)
            else:
                graph.insert_after(anchor, [*nodes, q, new_dq])
                old_out.replace_all_uses_with(out)
            for old in (old_out.producer(), dq):  # the float weight's Reshape and DequantizeLinear, once unused
                if old is not None and old.graph is graph and not any(True for o in old.outputs for _ in o.uses()):
                    graph.remove(old, safe=True)
        return ir.passes.PassResult(model, bool(self.layers))
