"""`rewrite`: graph conversion of a float ONNX model exported elsewhere, without a PyTorch model:
BatchNorm folding (onnxscript rewrite rules), weight QDQ (a Plan built from the ONNX
initializers with the numpy grid of cora_onnx.npgrid, applied by WeightQDQPass), optional
activation QDQ calibrated in ONNX Runtime, cleanup and the full checker."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .errors import InputError, OnnxModelError, SettingsError
from .io import atomic_write, check_output_path
from .plan import LayerPlan, Plan, UniformWeights

__all__ = ["RewriteResult", "rewrite_onnx", "MIN_OPSET", "MAX_OPSET", "weight_plan"]

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
MAX_OPSET = 23  # newest default-domain opset this tool is tested with (ONNX Runtime 1.32)
_CALIB_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True, eq=False)
class RewriteResult:
    report: dict
    data: bytes


def _load(path: str | os.PathLike) -> ir.Model:
    from .verify import load_onnx_bytes

    blob = load_onnx_bytes(path)
    try:
        return ir.serde.deserialize_model(onnx.load_from_string(blob))
    except Exception as exc:  # onnx_ir raises several types on unsupported content
        raise OnnxModelError(f"{path}: cannot read the graph ({str(exc).splitlines()[0][:200]})") from None


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _fold_batchnorm(model: ir.Model) -> int:
    """Constant-fold (so computed biases become initializers), then fuse BatchNormalization
    into the Conv/Gemm before it; returns how many were fused."""
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule

    fold_constants(model)
    n = RewriteRuleSet([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule]).apply_to_model(model)
    if n:
        fold_constants(model)
    left = sum(node.op_type == "BatchNormalization" for node in model.graph)
    if left:
        log.warning("%d BatchNormalization nodes are not after a Conv/Gemm and stay in the graph", left)
    return n


def _weight_layers(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    """(node, float weight initializer) for every Conv, and Gemm(transB=1) — the layouts whose
    output channels are axis 0, as WeightQDQPass stores them."""
    out = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT or w.name not in model.graph.initializers:
            continue
        if node.op_type == "Gemm" and not (node.attributes.get_int("transB", 0) and not node.attributes.get_int("transA", 0)):
            log.info("%s: Gemm without transB keeps a float weight (integer kernels quantize it with act-bits)", node.name)
            continue
        out.append((node, w))
    return out


def weight_plan(model: ir.Model, bits: int, keep_bits: int = 8, keep: Sequence[str] = ("first", "last"),
                clip: str = "mse") -> Plan:
    """A Plan (method "rtn", symmetric per-channel) from the model's float Conv/Gemm weights;
    initializers whose name does not end in ".weight" are renamed <name>.weight (Plan layers
    name weights that way)."""
    from .npgrid import quantize_symmetric

    layers = _weight_layers(model)
    seen: set[str] = set()
    layers = [(n, w) for n, w in layers if not (w.name in seen or seen.add(w.name))]
    first = next((w.name for n, w in layers if n.op_type == "Conv"), None)
    last = layers[-1][1].name if layers else None
    plans = []
    for node, w in layers:
        b = bits
        if ("first" in keep and w.name == first) or ("last" in keep and w.name == last):
            b = max(bits, keep_bits)
        if not w.name.endswith(".weight"):
            old = w.name
            del model.graph.initializers[old]
            w.name = f"{old}.weight"
            model.graph.register_initializer(w)
        arr = w.const_value.numpy()
        q, scale = quantize_symmetric(arr, b, clip=clip)
        deq = q.astype(np.float32) * scale.reshape((-1,) + (1,) * (arr.ndim - 1))
        err = float(((deq - arr) ** 2).mean() / max(float((arr ** 2).mean()), 1e-30))
        uniform = UniformWeights(bits=b, symmetric=True, per_channel=True, q=q, scale=scale,
                                 zero_point=np.zeros(scale.shape, np.int8))
        plans.append(LayerPlan(name=w.name[: -len(".weight")], kind="conv" if node.op_type == "Conv" else "linear",
                               shape=tuple(arr.shape), uniform=uniform, info={"relative_weight_mse": err}))
    return Plan(method="rtn", settings={"method": "rtn", "bits": bits, "keep": list(keep), "keep_bits": keep_bits,
                                        "clip": clip, "source": "onnx"}, layers=tuple(plans))


def rewrite_onnx(src: str | os.PathLike, out: str | os.PathLike, bits: int, *, act_bits: int | None = None,
                 calib: str | os.PathLike | Sequence[str | os.PathLike] | None = None, act_calib: str = "minmax",
                 mean=None, std=None,
                 input_size: int | None = None, crop_ratio: float = 1.0, keep: Sequence[str] = ("first", "last"),
                 keep_bits: int = 8, clip: str = "mse", out_format: str = "onnx", threads: int | None = None,
                 report: str | os.PathLike | None = None) -> RewriteResult:
    """Quantize a float ONNX classifier file: weights to `bits` (plus 8-bit activations with
    act_bits=8, calibrated on the images in `calib`: a folder or a list of folders, mixed). Writes
    `out` (ONNX or ORT format)."""
    from passes import packs

    from .pipeline import apply_plan, cleanup_passes

    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SettingsError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if out_format not in ("onnx", "ort"):
        raise SettingsError(f"output format must be onnx or ort, got {out_format!r}")
    if act_bits is not None and act_bits != 8:
        raise SettingsError(f"act_bits must be 8 (or None for float activations), got {act_bits!r}")
    if act_bits is not None and calib is None:
        raise SettingsError("integer activations (--act-bits 8) need calibration images (--calib DIR)")
    check_output_path(out, "output model")
    if report is not None:
        check_output_path(report, "report")
    if Path(out).resolve() == Path(src).resolve():
        raise InputError(f"output {out} would overwrite the input model")
    model = _load(src)
    opset = _opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxModelError(f"{src}: opset {opset} is not supported (rewrite handles opset {MIN_OPSET}-{MAX_OPSET})")
    if not any(n.op_type in _CALIB_OPS for n in model.graph):
        raise OnnxModelError(f"{src} has no Conv, Gemm or MatMul node: nothing to quantize")
    if len(model.graph.inputs) != 1:
        raise OnnxModelError(f"{src}: expected one graph input (an image batch), got {len(model.graph.inputs)}")
    float_size = Path(src).stat().st_size
    folded = _fold_batchnorm(model)
    scheme = None
    if act_bits is not None:
        from .int8 import choose_scheme

        scheme = choose_scheme()
        bits, keep_bits = min(bits, scheme.weight_bits), min(keep_bits, scheme.weight_bits)
    plan = weight_plan(model, bits, keep_bits, keep, clip)
    if not plan.layers:
        raise OnnxModelError(f"{src} has no Conv or Gemm with a float weight initializer to quantize")
    if opset < 21 and any(lp.uniform.bits <= 4 and not packs(lp.uniform.bits, lp.uniform.q.size) for lp in plan.layers):
        raise OnnxModelError(f"{src}: {bits}-bit weights are stored as INT4 (small 2-3-bit grids too), which needs "
                             f"opset >= 21 (the model has {opset}); use --bits 5 or more, or convert the model to "
                             f"opset 21 first")
    model = apply_plan(model, plan)
    rep: dict = {"input": str(src), "output": str(out), "opset": opset, "bits": bits, "batchnorm_folded": folded,
                 "layers": [{"name": lp.name, "bits": lp.uniform.bits, **lp.info} for lp in plan.layers]}
    if act_bits is not None:
        from .calibrate import CalibSettings
        from .data import Preprocess, load_images, parse_floats
        from .int8 import add_activation_qdq, integer_kernels
        from .models import IMAGENET_MEAN, IMAGENET_STD

        settings = CalibSettings(method=act_calib)
        shape = model.graph.inputs[0].shape
        size = input_size or (shape[-1] if shape is not None and isinstance(shape[-1], int) else 224)
        pre = Preprocess(input_size=int(size), crop_ratio=crop_ratio,
                         mean=parse_floats(mean if mean is not None else IMAGENET_MEAN, what="mean"),
                         std=parse_floats(std if std is not None else IMAGENET_STD, what="std"))
        images = load_images(calib, pre, what="calibration folder")
        _, _, pass_report = add_activation_qdq(model, images, scheme, settings, threads)
        model = ir.passes.PassManager(cleanup_passes())(model).model
        data = ir.to_proto(model).SerializeToString()
        rep["activations"] = {"bits": 8, "calibration": act_calib, "calib_images": len(images),
                              "scheme": scheme.to_json(), "integer_nodes": len(pass_report["integer_nodes"]),
                              "float_nodes": pass_report["float_nodes"],
                              "onnxruntime_kernels": integer_kernels(data)}
    else:
        data = ir.to_proto(model).SerializeToString()
    rep["onnx_bytes"] = len(data)
    rep["input_bytes"] = float_size
    if out_format == "ort":
        from .ort_format import to_ort

        data, rep["ort_format"] = to_ort(data)
    rep["weight_params"] = sum(int(np.prod(lp.shape)) for lp in plan.layers)
    rep["file_bits_per_weight"] = len(data) * 8 / rep["weight_params"]
    atomic_write(out, lambda f: f.write(data))
    if report is not None:
        from .report import write_report

        write_report(rep, report)
    return RewriteResult(rep, data)
