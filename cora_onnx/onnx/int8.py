"""Integer inference in ONNX Runtime: the activation / weight types for this CPU, the check
that quantized nodes really run as integer kernels (ORT's optimized graph), and the ONNX-side
pipeline that adds activation QDQ to a weight-quantized graph."""

from __future__ import annotations

import collections
import logging
from typing import Mapping

import onnx_ir as ir

from passes import ActivationQDQPass, IntegerFormsPass, QuantScheme, activation_layout

from cora_onnx.onnx.calibrate import CalibSettings, calibrate
from cora_onnx.core.errors import SettingsError
from cora_onnx.core.plan import ActivationPlan
from cora_onnx.core.options import ACT_BITS
from cora_onnx.onnx.report import Activations, cpu_flags

__all__ = ["choose_scheme", "integer_kernels", "INTEGER_OPS", "FLOAT_COMPUTE_OPS", "add_activation_qdq",
           "ACT_BITS", "activation_histograms", "activation_report", "activation_plan", "activation_qparams_of",
           "float_ops", "FLOAT_OP_REASONS"]

log = logging.getLogger(__name__)

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "ConvInteger", "MatMulInteger",
               "MatMulIntegerToFloat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul",
               "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "DynamicQuantizeMatMul", "MatMulNBits")
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
# ops that move or select 8-bit data as it is (their output has their input's type)
_DATA_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "MaxPool", "NhwcMaxPool", "Gather",
             "Resize", "Split", "Slice", "Pad", "ReorderInput", "ReorderOutput")
# integer kernels whose output is float (the logits of a QGemm without output quantization, ...)
_FLOAT_OUTPUT = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits")
FLOAT_OP_REASONS = {
    **{op: "a float Conv/Gemm/MatMul kernel: its weight or input carries no QDQ (e.g. a weight with group-wise "
           "scales, one whose grid does not fit this CPU's integer width, or a non-4-D input)" for op in FLOAT_COMPUTE_OPS},
    "ReduceMean": "ONNX Runtime has no integer kernel for ReduceMean (cora-onnx writes a mean over the two spatial "
                  "axes of a 4-D tensor as GlobalAveragePool, which has one)",
    "GlobalAveragePool": "its input or output carries no QDQ",
    "AveragePool": "its input or output carries no QDQ",
    "HardSwish": "ONNX Runtime's CPU provider has no integer kernel for it",
    "HardSigmoid": "ONNX Runtime's CPU provider has no integer kernel for it",
    "Clip": "a clip that does not start at 0 or has several consumers is not absorbed into the quantization, and has "
            "no integer kernel",
    "Relu": "a Relu that is not the only consumer of a quantized output is not absorbed, and has no integer kernel",
    "Softmax": "the classifier's probabilities stay float",
    "Add": "one input is a constant or not quantized",
    "Mul": "one input is a constant or not quantized",
}


def choose_scheme(flags: Mapping | None = None, act_dtype: str | None = None,
                  weight_bits: int | None = None) -> QuantScheme:
    """Activation type and weight width for the CPU (cora_onnx.onnx.report.cpu_flags()).

    x86 with VNNI (AVX512-VNNI / AVX-VNNI): u8 activations, 8-bit weights. x86 without VNNI:
    u8 x s8 products are summed in int16 by VPMADDUBSW and saturate with 8-bit weights, so
    weights use 7 bits (reduce_range). ARM: u8 activations, 8-bit weights (dot-product kernels
    do not saturate). Explicit act_dtype / weight_bits override the choice."""
    flags = dict(cpu_flags() if flags is None else flags)
    machine = str(flags.get("machine", "")).lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        scheme = QuantScheme("uint8", 8, f"ARM ({'with' if flags.get('arm_dotprod') else 'without'} dot product): "
                                         "u8 activations, 8-bit weights")
    elif flags.get("vnni"):
        scheme = QuantScheme("uint8", 8, "x86 with VNNI: u8 activations x 8-bit weights do not saturate")
    else:
        scheme = QuantScheme("uint8", 7, f"x86 {'AVX2 ' if flags.get('avx2') else ''}without VNNI: u8 x s8 products "
                                         "saturate in int16 unless weights use 7 bits (reduce_range)")
    if act_dtype is not None or weight_bits is not None:
        try:
            scheme = QuantScheme(act_dtype or scheme.act_dtype, weight_bits or scheme.weight_bits, "set by the user")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    return scheme


def integer_kernels(model_bytes: bytes) -> dict:
    """Optimize the model as an ONNX Runtime CPU session does (level ALL) and count what runs:
    integer kernels (INTEGER_OPS), float Conv/Gemm/MatMul kernels, every op type."""
    from cora_onnx.onnx.verify import optimized_graph

    proto = optimized_graph(model_bytes)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {"integer": sum(ops[o] for o in INTEGER_OPS), "float_compute": sum(ops[o] for o in FLOAT_COMPUTE_OPS),
            "ops": dict(sorted(ops.items()))}


def activation_report(pass_report: dict, images, scheme: QuantScheme, calib: CalibSettings, model_bytes: bytes,
                      seconds: float) -> Activations:
    """The `activations` section of a report (quantize and rewrite): the calibration, the scheme,
    what ActivationQDQPass made integer (its `pass_report`) and which kernels ONNX Runtime runs in
    the finished file `model_bytes`."""
    return Activations(bits=8, calibration=calib.method, calib_images=len(images), calib_seconds=seconds,
                       scheme=scheme.to_json(), integer_nodes=len(pass_report["integer_nodes"]),
                       float_nodes=tuple(pass_report["float_nodes"]),
                       activation_tensors=pass_report["activation_tensors"],
                       absorbed_activations=pass_report["absorbed_activations"],
                       onnxruntime_kernels=integer_kernels(model_bytes))


def _layout(model: ir.Model):
    layout = activation_layout(model)
    if not layout.compute:
        raise SettingsError("the model has no Conv/Gemm/MatMul/Add node that can run as an integer kernel")
    return layout


def activation_histograms(model: ir.Model, images, calib: CalibSettings = CalibSettings(),
                          threads: int | None = None) -> dict:
    """One calibration pass of `model` (weights already QDQ or float) over `images`: the
    histogram of each activation tensor add_activation_qdq calibrates, from which every range
    method (calib.method does not matter here) computes its ranges."""
    from cora_onnx.onnx.calibrate import collect_histograms
    from cora_onnx.core.modelfile import onnx_bytes

    IntegerFormsPass()(model)
    layout = _layout(model)
    n = (len(images) + calib.batch_size - 1) // calib.batch_size
    return collect_histograms(onnx_bytes(model), layout.calibrate, images.batches(calib.batch_size), n, calib.bins,
                              threads)


def activation_plan(model: ir.Model, images, scheme: QuantScheme, calib: CalibSettings = CalibSettings(),
                    threads: int | None = None, histograms: dict | None = None,
                    weight_clip: str | None = None) -> ActivationPlan:
    """Calibrate the activations of `model` (weights already QDQ or float; rewritten in place into
    the forms ONNX Runtime has integer kernels for, passes.IntegerFormsPass) on `images`: the
    plan's integer-activation section (scheme and every calibrated range), which
    cora_onnx.onnx.pipeline.apply_activations writes into the graph. histograms: from
    activation_histograms(model, images) when several range methods share one calibration pass."""
    from cora_onnx.onnx.calibrate import compute_ranges
    from cora_onnx.core.modelfile import onnx_bytes

    IntegerFormsPass()(model)  # the forms with integer kernels first: the ranges are of their tensors
    layout = _layout(model)
    ranges = calibrate(onnx_bytes(model), layout.calibrate, images, calib, threads) if histograms is None else \
        compute_ranges(histograms, calib)
    return ActivationPlan(act_dtype=scheme.act_dtype, weight_bits=scheme.weight_bits, ranges=ranges,
                          calibration=calib.method, reason=scheme.reason, weight_clip=weight_clip)


def activation_qparams_of(model: ir.Model, act: ActivationPlan) -> dict[str, tuple[float, int]]:
    """Tensor name -> (scale, zero point) that the plan's activations give `model` (before the
    activation pass), e.g. for the PyTorch simulation of the integer activations."""
    from passes import activation_qparams

    return activation_qparams(act.ranges, QuantScheme(act.act_dtype, act.weight_bits, act.reason), _layout(model))


def add_activation_qdq(model: ir.Model, images, scheme: QuantScheme, calib: CalibSettings = CalibSettings(),
                       threads: int | None = None, weight_clip: str | None = None,
                       histograms: dict | None = None) -> tuple[dict, dict, dict]:
    """Calibrate the activations of `model` (weights already QDQ or float) on `images` and insert
    activation QDQ in place (no cleanup). Returns (ranges, qparams by tensor, pass report).
    histograms: as activation_plan's."""
    act = activation_plan(model, images, scheme, calib, threads, histograms, weight_clip)
    qparams = activation_qparams_of(model, act)
    p = ActivationQDQPass(act.ranges, scheme, weight_clip=weight_clip)
    p(model)
    return dict(act.ranges), qparams, p.report


def float_ops(optimized) -> list[dict]:
    """The nodes of ONNX Runtime's optimized graph (an onnx.ModelProto from
    cora_onnx.onnx.verify.optimized_graph) that compute on float data, with why, in graph order:
    [{"node", "op", "after_first_quantize", "reason"}]. Tensor types are followed from the graph
    inputs: QuantizeLinear and integer kernels make 8-bit data, DequantizeLinear and every other op
    float, data-movement ops keep their input's type. QuantizeLinear / DequantizeLinear
    themselves (the conversions) are not listed."""
    import onnx

    graph = optimized.graph
    consts = {t.name for t in graph.initializer}
    kind = {i.name: "float" if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            else "int" for i in graph.input}
    out, seen_q = [], False
    for n in graph.node:
        inputs = [kind.get(x, "float") for x in n.input if x and x not in consts]
        if n.op_type == "QuantizeLinear":
            res, seen_q = "int", True
        elif n.op_type == "DequantizeLinear" or n.op_type in _FLOAT_OUTPUT:
            res = "float"
        elif n.op_type in INTEGER_OPS:
            res = "float" if n.op_type == "QGemm" and len(n.input) < 8 else "int"  # QGemm without y_scale: float logits
        elif n.op_type in _DATA_OPS and inputs:
            res = inputs[0]
        else:
            res = "float"
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.op_type not in INTEGER_OPS \
                and "float" in inputs:
            out.append({"node": n.name, "op": n.op_type, "after_first_quantize": seen_q,
                        "reason": FLOAT_OP_REASONS.get(n.op_type, "no QDQ around it, or no integer kernel for it in "
                                                                  "ONNX Runtime's CPU provider")})
        for o in n.output:
            kind[o] = res
    return out
