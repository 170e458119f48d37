"""CodebookDecodePass: replace each product-quantized Conv/Gemm weight by a decoding subgraph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Plan

from ._util import add_initializer, bias_adds, default_opset, mark, planned_weight, require_weights

__all__ = ["CodebookDecodePass"]


class CodebookDecodePass(ir.passes.InPlacePass):
    """For every layer of the plan with a codebook, store the codes as a UINT8 initializer
    <w>_codes (C_out, sub-vectors per filter; UINT16 with more than 256 codewords) and the
    codewords as FLOAT16 <w>_codewords (k, d); the weight is computed in the graph (the layout of
    `Codebook.decode`):

        Cast(<w>_codes -> INT32), Cast(<w>_codewords -> FLOAT) -> Gather(axis 0) -> Reshape(<w>_shape)
        [-> Mul(<w>_codescale, through Cast -> FLOAT when stored as float16)]  =  <w>_decoded

    (Gather needs int32/int64 indices, so the codes are widened in the graph.) A corrected
    bias in the plan replaces the layer's bias input (<layer>.bias_corrected, float32, or float16
    followed by Cast -> <w>_bias_float): the Conv/Gemm's third input, or for a Linear the exporter
    wrote as Transpose -> MatMul -> Add, that Add's initializer input (in that Add only: the
    exporter shares equal initializers, e.g. zero biases, among layers). The float weight initializer is removed; cleanup removes
    the old bias. Every node made is marked with the pass; the layer's facts (block size,
    codewords, code type) go on its Gather only."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.layers = [layer for layer in plan.layers if layer.codebook is not None]

    def requires(self, model: ir.Model) -> None:
        have = default_opset(model)
        if self.layers and have < 13:
            raise ir.passes.PreconditionError(f"CodebookDecodePass needs opset >= 13, the model has {have}")
        require_weights(model, self.layers)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        name = type(self).__name__
        modified = False
        for layer in self.layers:
            cb = layer.codebook
            old, consumers = planned_weight(graph, layer)
            bad = [n.op_type for n in consumers if n.op_type not in ("Conv", "Gemm", "Transpose")]
            if bad:
                raise PlanError(f"layer {layer.name}: weight feeds {bad[0]}, expected Conv, Gemm or Transpose (a "
                                f"Linear as MatMul)")
            w = layer.weight
            facts = dict(layer=layer.name, block_size=cb.block_size, codewords=cb.codewords.shape[0],
                         codes=cb.codes.dtype.name)
            codes = add_initializer(graph, f"{w}_codes", ir.Tensor(np.ascontiguousarray(cb.codes), name=f"{w}_codes"))
            books = add_initializer(graph, f"{w}_codewords", ir.Tensor(np.ascontiguousarray(cb.codewords, np.float16),
                                                                       name=f"{w}_codewords"))
            shape = add_initializer(graph, f"{w}_shape", ir.Tensor(np.array(layer.shape, dtype=np.int64),
                                                                   name=f"{w}_shape"))
            nodes = []

            def node(op, inputs, out, **attrs):
                n = ir.node(op, inputs, attributes=attrs, name=f"{w}_{out}")
                n.outputs[0].name = f"{w}_{out}"
                mark(n, name, **(facts if op == "Gather" else {}))  # the layer's facts once, on its Gather
                nodes.append(n)
                return n.outputs[0]

            idx = node("Cast", [codes], "codes_int32", to=ir.DataType.INT32)
            table = node("Cast", [books], "codewords_float", to=ir.DataType.FLOAT)
            gathered = node("Gather", [table, idx], "gathered", axis=0)
            decoded = node("Reshape", [gathered, shape], "decoded" if cb.scale is None else "unscaled")
            if cb.scale is not None:
                sshape = (-1,) + (1,) * (len(layer.shape) - 1)
                scale = add_initializer(graph, f"{w}_codescale", ir.Tensor(
                    np.ascontiguousarray(cb.scale).reshape(sshape), name=f"{w}_codescale"))
                if cb.scale.dtype != np.float32:
                    scale = node("Cast", [scale], "codescale_float", to=ir.DataType.FLOAT)
                decoded = node("Mul", [decoded, scale], "decoded")
            decoded.dtype = ir.DataType.FLOAT
            decoded.shape = ir.Shape(layer.shape)
            bias = None
            if cb.bias is not None:
                bias = add_initializer(graph, f"{layer.name}.bias_corrected",
                                       ir.Tensor(np.ascontiguousarray(cb.bias), name=f"{layer.name}.bias_corrected"))
                if cb.bias.dtype != np.float32:  # float16 on disk; Conv/Gemm want the weight's type
                    bias = node("Cast", [bias], "bias_float", to=ir.DataType.FLOAT)
                    bias.dtype, bias.shape = ir.DataType.FLOAT, ir.Shape(cb.bias.shape)
            anchor = consumers[0] if consumers else None
            for n in nodes:
                if anchor is not None:
                    graph.insert_before(anchor, n)
                else:
                    graph.append(n)
            old.replace_all_uses_with(decoded)
            del graph.initializers[w]
            if bias is not None and all(n.op_type in ("Conv", "Gemm") for n in consumers):
                for n in consumers:
                    if len(n.inputs) < 3:
                        n.resize_inputs(3)
                    n.replace_input_with(2, bias)
            elif bias is not None:  # Transpose -> MatMul -> Add: the Add's bias input takes it
                adds = bias_adds(consumers)
                if len(adds) != 1:
                    raise PlanError(f"layer {layer.name}: its weight feeds a Transpose, and no single MatMul -> Add "
                                    f"after it can take the corrected bias")
                add, idx = adds[0]
                add.replace_input_with(idx, bias)  # this Add only: exporters share equal initializers
            modified = True
        return ir.passes.PassResult(model, modified)

