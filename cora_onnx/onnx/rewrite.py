"""`rewrite`: graph conversion of a float ONNX model exported elsewhere, without a PyTorch model:
BatchNorm fusion (onnxscript rewrite rules), weight QDQ (a Plan built from the ONNX
initializers with the numpy grid of cora_onnx.core.npgrid, applied by WeightQDQPass), optional
activation QDQ calibrated in ONNX Runtime, cleanup and the full checker."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from cora_onnx.core.errors import InputError, OnnxModelError, SettingsError
from cora_onnx.core.files import atomic_write
from cora_onnx.core.options import RunOptions, weight_layout_for
from cora_onnx.core.plan import LayerPlan, Plan, UniformWeights, WeightFingerprint
from cora_onnx.core.progress import progress
from cora_onnx.core.records import to_json
from cora_onnx.onnx.report import RewriteReport, write_report

__all__ = ["RewriteResult", "rewrite_onnx", "MIN_OPSET", "MAX_OPSET", "weight_plan"]

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
INT4_OPSET = 21  # INT4/UINT4 QuantizeLinear/DequantizeLinear
MAX_OPSET = 23  # newest default-domain opset this tool is tested with (ONNX Runtime 1.32)
_CALIB_OPS = ("Conv", "Gemm", "MatMul")
# a rewritten model with this many bytes of initializers or more is written with external data
# (protobuf cannot serialize 2 GiB)
SELF_CONTAINED_LIMIT = 2**31 - 2**26


@dataclass(frozen=True, eq=False)
class RewriteResult:
    report: RewriteReport
    data: bytes | None  # None when the model was written with external data


def _deserialize(proto: onnx.ModelProto, path) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on unsupported content
        raise OnnxModelError(f"{path}: cannot read the graph ({str(exc).splitlines()[0][:200]})") from None


def _proto_opset(proto: onnx.ModelProto) -> int:
    return max((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _graph_input(proto: onnx.ModelProto, path) -> tuple[str, list | None, str]:
    """(name, shape with None for symbolic dims, element type) of the model's one input
    (initializers listed as inputs do not count)."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxModelError(f"{path}: expected one graph input (an image batch), got {len(inputs)}"
                             + (f" ({', '.join(i.name for i in inputs)})" if inputs else ""))
    t = inputs[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
    etype = "FLOAT" if t.elem_type == onnx.TensorProto.FLOAT else onnx.TensorProto.DataType.Name(t.elem_type)
    return inputs[0].name, shape, etype


UPGRADE_CHECK_INPUTS = 4  # random images the upgraded float model must reproduce in ONNX Runtime


def upgrade_opset(proto: onnx.ModelProto, target: int, path, spec=None,
                  threads: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """Convert the default-domain opset to `target` with onnx.version_converter, then check in
    ONNX Runtime that the converted float model gives the original's outputs on random inputs
    (images when `spec`, an InputSpec, is given; else the input's declared shape).
    OnnxModelError (one line) when the converter cannot convert or the outputs differ."""
    from onnx import version_converter

    from cora_onnx.onnx.verify import run_batch, session

    source = _proto_opset(proto)
    try:
        new = version_converter.convert_version(proto, target)
        onnx.checker.check_model(new)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise OnnxModelError(f"{path}: opset {source} cannot be converted to opset {target} (the opset the passes "
                             f"need) by onnx.version_converter: {msg}") from None
    name, shape, _ = _graph_input(proto, path)
    if spec is not None:
        n = spec.batch or 2
        batch_shape = (n, 3, spec.size or 224, spec.size or 224)
    else:  # not an image input (weight-only rewrite): its declared shape, symbolic dims 1
        from cora_onnx.onnx.verify import InputSpec

        if shape is None:
            raise OnnxModelError(f"{path}: input {name!r} has no shape; the opset upgrade cannot be checked")
        spec = InputSpec(name, "NCHW", None, None)
        batch_shape = tuple(d or 1 for d in shape)
    rng = np.random.default_rng(0)
    old_s, new_s = session(proto.SerializeToString(), threads=threads), session(new.SerializeToString(), threads=threads)
    worst, scale = 0.0, 0.0
    for i in range(0, UPGRADE_CHECK_INPUTS, batch_shape[0] if batch_shape else 1):
        x = rng.standard_normal(batch_shape, dtype=np.float32)
        a, b = run_batch(old_s, spec, x), run_batch(new_s, spec, x)
        for u, v in zip(a, b):
            worst = max(worst, float(np.abs(np.asarray(u, np.float64) - v).max()) if np.size(u) else 0.0)
            scale = max(scale, float(np.abs(u).max()) if np.size(u) else 0.0)
    if not worst <= 1e-4 * max(scale, 1.0):
        raise OnnxModelError(f"{path}: converting opset {source} to {target} changed the model's outputs in ONNX "
                             f"Runtime (max |diff| {worst:.3g} on random images); not rewriting it")
    log.info("upgraded opset %d to %d (onnx.version_converter); ONNX Runtime outputs agree on %d random images "
             "(max |diff| %.3g)", source, target, UPGRADE_CHECK_INPUTS, worst)
    return new, {"from": source, "to": target, "check_images": UPGRADE_CHECK_INPUTS, "max_abs_diff": worst}


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _fuse_batchnorm(model: ir.Model) -> int:
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
    from cora_onnx.core.npgrid import quantize_symmetric

    layers = _weight_layers(model)
    seen: set[str] = set()
    layers = [(n, w) for n, w in layers if not (w.name in seen or seen.add(w.name))]
    first = next((w.name for n, w in layers if n.op_type == "Conv"), None)
    last = layers[-1][1].name if layers else None
    plans = []
    for node, w in progress(layers, len(layers), "rewrite: weight grids", "layers"):
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
                               shape=tuple(arr.shape), uniform=uniform, info={"relative_weight_mse": err},
                               fingerprint=WeightFingerprint.of(arr)))
    return Plan(method="rtn", settings={"method": "rtn", "bits": bits, "keep": list(keep), "keep_bits": keep_bits,
                                        "clip": clip, "source": "onnx"}, layers=tuple(plans))


REWRITE_METHOD_OPTIONS = {"clip": ("mse", "minmax")}  # rewrite's own weight grid: option -> choices (default: by width)


def rewrite_onnx(src: str | os.PathLike, options: RunOptions | None = None, **keywords) -> RewriteResult:
    """Quantize a float ONNX classifier file as the run options say (`options`, or keywords that
    build them: RunOptions.of): weights to `bits` (out, bits, keep (default first,last), keep_bits
    (default 8), method option clip: mse or minmax), plus 8-bit activations with act_bits=8,
    calibrated on the images in `calib` (a folder or a list of folders, mixed) with act_calib and
    the preprocessing (input_size: the model's when fixed; mean, std, crop_ratio). Writes `out`
    (out_format ONNX or ORT format; weights in weight_layout, core.options.weight_layout_for) and,
    when given, the JSON `report`."""

    from cora_onnx.onnx.pipeline import apply_plan, cleanup_passes

    opts = RunOptions.resolve(options, **keywords)
    if opts.out is None:
        raise SettingsError("rewrite needs an output path (out=)")
    out, bits, act_bits, report, threads = opts.out, opts.bits, opts.act_bits, opts.report, opts.threads
    keep = ("first", "last") if opts.keep is None else opts.keep
    if any(k not in ("first", "last") for k in keep):
        raise SettingsError(f"rewrite keeps first, last or none, got {','.join(keep)!r}")
    keep_bits = 8 if opts.keep_bits is None else opts.keep_bits
    for name, value in opts.method_options.items():
        if name not in REWRITE_METHOD_OPTIONS:
            raise SettingsError(f"rewrite has no option {name!r}; its options: {', '.join(REWRITE_METHOD_OPTIONS)}")
        if value is not None and value not in REWRITE_METHOD_OPTIONS[name]:
            raise SettingsError(f"{name} must be one of {', '.join(REWRITE_METHOD_OPTIONS[name])}, got {value!r}")
    clip = opts.method_options.get("clip")  # None: npgrid.default_clip of each layer's width
    if Path(out).resolve() == Path(src).resolve():
        raise InputError(f"output {out} would overwrite the input model")
    from cora_onnx.core.modelfile import read_model

    mf = read_model(src)
    if mf.format == "ort":
        raise OnnxModelError(f"{src} is an ORT-format file (already optimized for ONNX Runtime); rewrite needs the "
                             "ONNX model it was made from")
    proto = mf.proto()
    opset = _proto_opset(proto)
    if opset > MAX_OPSET:
        raise OnnxModelError(f"{src}: opset {opset} is newer than this tool handles (opset {MIN_OPSET}-{MAX_OPSET})")
    if not any(n.op_type in _CALIB_OPS for n in proto.graph.node):
        raise OnnxModelError(f"{src} has no Conv, Gemm or MatMul node: nothing to quantize")
    from cora_onnx.onnx.verify import InputSpec

    name, shape, etype = _graph_input(proto, src)
    try:
        spec, not_image = InputSpec.from_shape(name, shape, str(src), etype), None
    except OnnxModelError as exc:  # weight-only rewriting needs no images
        spec, not_image = None, exc
    if not_image is not None and act_bits is not None:
        raise not_image
    size = opts.input_size or (spec.size if spec else None) or 224
    if spec is not None and spec.size is not None and size != spec.size:
        raise SettingsError(f"{src} takes {spec.size}x{spec.size} images (fixed in the model), got input size {size}")
    scheme = None
    if act_bits is not None:
        from cora_onnx.onnx.int8 import choose_scheme

        scheme = choose_scheme()
        bits, keep_bits = min(bits, scheme.weight_bits), min(keep_bits, scheme.weight_bits)
    # INT4 storage (weights at 4 bits or fewer, float activations; small 2-3-bit grids too) needs opset 21
    need = INT4_OPSET if bits <= 4 and act_bits is None else MIN_OPSET
    upgraded = None
    if opset < need:
        proto, upgraded = upgrade_opset(proto, need, src, spec, threads)
    model = _deserialize(proto, src)
    del proto
    float_size = mf.disk_bytes
    fused = _fuse_batchnorm(model)
    plan = weight_plan(model, bits, keep_bits, keep, clip)
    if not plan.layers:
        raise OnnxModelError(f"{src} has no Conv or Gemm with a float weight initializer to quantize")
    model = apply_plan(model, plan, weight_layout=weight_layout_for(opts.weight_layout, act_bits, opts.out_format))
    external = _initializer_bytes(model) >= SELF_CONTAINED_LIMIT
    out_format = opts.out_format
    if external and (act_bits is not None or out_format == "ort"):
        raise OnnxModelError(f"{src}: the rewritten model holds 2 GB of weights or more; it can only be written as ONNX "
                             "with external data, weight-only (without --act-bits and --format ort)")
    activations = ort_format = external_data = None
    if act_bits is not None:
        from cora_onnx.onnx.calibrate import CalibSettings
        from cora_onnx.onnx.data import load_images
        from cora_onnx.onnx.int8 import activation_report, add_activation_qdq

        t0 = time.perf_counter()
        settings = CalibSettings(method=opts.act_calib)
        pre = opts.replace(input_size=int(size)).preprocess
        images = load_images(opts.calib, pre, what="calibration folder")
        _, _, pass_report = add_activation_qdq(model, images, scheme, settings, threads)
        model = ir.passes.PassManager(cleanup_passes())(model).model
        data = ir.to_proto(model).SerializeToString()
        activations = activation_report(pass_report, images, scheme, settings, data, time.perf_counter() - t0)
    elif external:
        data = None
    else:
        data = ir.to_proto(model).SerializeToString()
    if data is None:
        external_data = _save_external(model, Path(out))
        onnx_size = output_size = Path(out).stat().st_size + external_data["bytes"]
    else:
        onnx_size = len(data)
        if out_format == "ort":
            from cora_onnx.onnx.ort_format import to_ort

            data, ort_format = to_ort(data)
        output_size = len(data)
        atomic_write(out, lambda f: f.write(data))
    weight_params = sum(int(np.prod(lp.shape)) for lp in plan.layers)
    rep = RewriteReport(
        input=str(src), output=str(out), opset=_opset(model), bits=bits, batchnorm_fused=fused,
        input_tensor={"name": name, "layout": spec.layout if spec else None, "fixed_batch": spec.batch if spec else None},
        layers=tuple(to_json({"name": lp.name, "bits": lp.uniform.bits, **lp.info}) for lp in plan.layers),
        opset_upgrade=upgraded or None, activations=activations, input_bytes=float_size,
        input_external_data=dict(mf.external) if mf.external else None, external_data=external_data,
        onnx_bytes=onnx_size, output_bytes=output_size, ort_format=ort_format, weight_params=weight_params,
        file_bits_per_weight=output_size * 8 / weight_params)
    if report is not None:
        write_report(rep, report)
    return RewriteResult(rep, data)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save_external(model: ir.Model, out: Path) -> dict:
    """Write `out` with its weights in `<out name>.data` beside it (both written under temporary
    names, then renamed: no partial output)."""
    import shutil
    import tempfile

    name = f"{out.name}.data"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        ir.save(model, tmp / out.name, external_data=name)
        os.replace(tmp / name, out.parent / name)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out.parent / name).stat().st_size
    log.info("the model holds 2 GB of weights or more: weights written to %s beside it", name)
    return {"file": name, "bytes": size}
