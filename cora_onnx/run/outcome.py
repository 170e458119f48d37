"""The last stages of `cora_onnx.quantize` (see cora_onnx.run.stages for the first ones):

    verify_quantized -> make_report -> write_outputs

and `float_reference`, the float side of the verification computed once for many runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from cora_onnx.onnx.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess, load_class_map, load_images, parse_floats
from cora_onnx.core.errors import ConstantOutputError, ParityError
from cora_onnx.torch.export import export_onnx, fuse_batchnorm, remaining_batchnorm
from cora_onnx.core.files import atomic_write
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.core.plan import Plan
from cora_onnx.core.records import to_json
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.onnx.report import Figures, Outcome, QuantizeReport, Top1, environment, write_report
from cora_onnx.torch.search import METHODS
from cora_onnx.run.stages import Data, Exported, Options, Searched, load_model, num_classes
from cora_onnx.onnx.verify import Verdict, failed_path, fidelity, measure_latency, session, size_breakdown, top1
from cora_onnx.torch.verify import PROBE_IMAGES, FileCheck, check_file, failure_message, predict_torch

__all__ = ["Verification", "verify_quantized", "make_report", "write_outputs", "effective_bits", "size_target_report",
           "FloatReference",
           "float_reference", "PROBE_IMAGES"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, eq=False)
class Verification:
    """figures: what verification measured (top-1, parity with its verdict, fidelity to float
    with val, latency, sizes); check: the file against its PyTorch reference
    (cora_onnx.torch.verify.check_file: the verdict, the reference kind, the probe images)."""

    figures: Figures
    check: FileCheck

    @property
    def verdict(self) -> Verdict:
        return self.check.verdict

    @property
    def kind(self) -> str:
        return self.check.kind

    @property
    def verified(self) -> bool:
        return self.check.verdict.verified

    @property
    def failure(self) -> str | None:
        return self.check.verdict.failure


def verify_quantized(model: nn.Module, exported: Exported, data: Data, opts: Options,
                     float_logits: np.ndarray | None = None) -> Verification:
    """Check the quantized ONNX file in ONNX Runtime against the PyTorch model it came from
    (exported.qmodel) on val (else on up to opts.parity_images calib images), top-1 of the float
    model (float_logits when given), the quantized PyTorch model and ONNX Runtime on val, fidelity
    to float, sizes, and latency (skipped when opts.latency_runs is 0 or the check failed)."""
    scheme = opts.scheme
    qsess = session(exported.quant_bytes, threads=opts.threads)
    val_set, t1, fid, f_logits = data.val, Top1(), None, None
    if val_set is not None:
        f_logits = predict_torch(model, val_set, opts.batch_size, "PyTorch, float") if float_logits is None else \
            np.asarray(float_logits, dtype=np.float32)
    check = check_file(exported.quant_bytes, exported.qmodel,
                       val_set if val_set is not None else data.calib.subset(opts.parity_images, opts.seed),
                       scheme is not None, sess=qsess, batch_size=opts.batch_size, threads=opts.threads,
                       float_logits=f_logits)
    if val_set is not None:
        t1 = Top1(top1(f_logits, val_set.labels), top1(check.reference, val_set.labels),
                  top1(check.logits, val_set.labels))
        fid = fidelity(check.logits, f_logits)
    verdict = check.verdict
    shape = (3, opts.pre.input_size, opts.pre.input_size)
    batches = (1,) if not opts.latency_batch or opts.latency_batch == 1 else (1, opts.latency_batch)
    timed = opts.latency_runs > 0 and verdict.verified  # a file that is not handed over is not timed
    if timed:
        log.info("measuring latency (%d interleaved runs per model and batch size)", opts.latency_runs)
    models = {"float": exported.float_bytes, "quantized": qsess}
    if scheme is None and opts.weights == "qdq":  # weight DequantizeLinear folded at load: weight-only files
        models["quantized_folded"] = session(exported.quant_bytes, threads=opts.threads, fold_weight_dq=True)
    models.update(exported.extra)
    lat = measure_latency(models, shape, batch_sizes=batches, runs=opts.latency_runs, threads=opts.threads,
                          seed=opts.seed) if timed else {}  # 0 runs: timing skipped
    figures = Figures(top1=t1, parity=verdict.parity, fidelity_to_float=fid,
                      latency_ms={k: lat[k]["batch_1"]["median_ms"] if k in lat else None
                                  for k in ("float", "quantized", "quantized_folded", *exported.extra)},
                      latency=lat, size_breakdown={"float": size_breakdown(exported.float_bytes),
                                                   "quantized": size_breakdown(exported.quant_bytes)})
    return Verification(figures, check)


def make_report(searched: Searched, exported: Exported, verification: Verification, data: Data,
                opts: Options) -> QuantizeReport:
    """The run's report (verified says whether the check held; the file's bits per weight come
    when write_outputs writes it)."""
    plan, fused, pre = searched.plan, searched.fused, opts.pre
    quant_bytes, float_bytes = exported.quant_bytes, exported.float_bytes
    qlayers = quantizable_layers(fused)
    weight_params = sum(mod.weight.numel() for mod in qlayers.values())
    m = METHODS[opts.search]
    return QuantizeReport(
        model=plan.meta["model"], method=opts.search, bits=opts.bits, onnx_path=str(opts.out),
        onnx_bytes=len(quant_bytes), float_onnx_bytes=len(float_bytes),
        compression_ratio=len(float_bytes) / len(quant_bytes),
        weight_params=weight_params, effective_bits=effective_bits(plan, qlayers),
        figures=verification.figures, search_seconds=searched.seconds,
        options=opts.to_json(), settings=to_json(plan.settings),
        layers=tuple(to_json({"name": lp.name, "bits": lp.uniform.bits if lp.uniform else None, **dict(lp.info)})
                     for lp in plan.layers),
        preprocess={"input_size": pre.input_size, "crop_ratio": pre.crop_ratio, "mean": list(pre.mean),
                    "std": list(pre.std)},
        images={"calib": len(data.calib) if data.calib is not None else 0,
                "val": len(data.val) if data.val is not None else 0},
        environment=environment(opts.threads),
        notes=tuple((_notes(plan, opts.weights) if opts.scheme is None else []) + _batchnorm_notes(fused)),
        method_report=to_json(m.report(plan)) if m.report is not None else {},
        size_target=size_target_report(plan, len(quant_bytes)) if "size_target" in plan.meta else None,
        activations=exported.act_report, outcome=Outcome(verified=verification.verified))


def write_outputs(report: QuantizeReport, searched: Searched, exported: Exported, verification: Verification,
                  opts: Options) -> QuantizeReport:
    """Write the model to opts.out (converted to ORT format with opts.out_format "ort") and the
    float model, plan and report when asked for, each to a temporary name, then renamed; returns
    the report with the file's bits per weight. When the check failed: the model is kept as
    NAME.failed.onnx (never under opts.out), the report says why and where the layers' outputs
    diverge, and ParityError (ConstantOutputError for outputs that do not depend on the input)."""
    quant_bytes, float_bytes = exported.quant_bytes, exported.float_bytes
    weight_params = max(report.weight_params, 1)
    if not verification.verified:
        _parity_failed(dataclasses.replace(report, file_bits_per_weight=len(quant_bytes) * 8 / weight_params,
                                           float_file_bits_per_weight=len(float_bytes) * 8 / weight_params),
                       searched, exported, verification, opts)
    file_bytes, ort_format, notes = quant_bytes, None, report.notes
    if opts.out_format == "ort":
        from cora_onnx.onnx.ort_format import to_ort

        file_bytes, ort_format = to_ort(quant_bytes)
        if len(file_bytes) > 1.05 * len(quant_bytes):
            notes += (f"the ORT format file ({len(file_bytes) / 1e6:.2f} MB) is larger than the ONNX file "
                      f"({len(quant_bytes) / 1e6:.2f} MB): ONNX Runtime's optimizer decodes packed low-bit grids (and "
                      f"Casts of INT4 grids) at conversion and stores the 8-bit result",)
    report = dataclasses.replace(report, notes=notes, ort_format=ort_format,
                                 file_bits_per_weight=len(file_bytes) * 8 / weight_params,
                                 float_file_bits_per_weight=len(float_bytes) * 8 / weight_params)
    atomic_write(opts.out, lambda f: f.write(file_bytes))
    _write_side_outputs(report, exported.plan or searched.plan, float_bytes, opts)
    return report


def _parity_failed(report: QuantizeReport, searched: Searched, exported: Exported, verification: Verification,
                   opts: Options) -> None:
    """Keep the model as NAME.failed.onnx, write the report with verified false (and the plan and
    float model when asked for), and raise ParityError naming where the file diverges
    (ConstantOutputError when the outputs do not depend on the input)."""
    verdict, failed = verification.verdict, failed_path(opts.out)
    msg, located = failure_message(verification.check, exported.quant_bytes, exported.qmodel,
                                   list(quantizable_layers(searched.fused)),
                                   f"the model was not written to {opts.out}, it is kept as {failed} for inspection",
                                   threads=opts.threads)
    atomic_write(failed, lambda f: f.write(exported.quant_bytes))
    report = dataclasses.replace(report, onnx_path=str(failed), outcome=Outcome(
        verified=False, failure="constant_output" if verdict.constant_output else "parity", parity_error=msg,
        parity_layer=located))
    _write_side_outputs(report, exported.plan or searched.plan, exported.float_bytes, opts)
    raise (ConstantOutputError if verdict.constant_output else ParityError)(msg)


def _write_side_outputs(report: QuantizeReport, plan: Plan, float_bytes: bytes, opts: Options) -> None:
    """The float model, the plan and the report, each when asked for."""
    if opts.float_out is not None:
        atomic_write(opts.float_out, lambda f: f.write(float_bytes))
    if opts.plan_out is not None:
        plan.save(opts.plan_out)
    if opts.report is not None:
        write_report(report, opts.report)


def size_target_report(plan: Plan, file_bytes: int) -> dict:
    """The report's size_target section: the target, the limit, the predicted and actual file, and
    the overhead (what is neither weights nor codes: graph, names, biases, metadata)."""
    t = dict(plan.meta["size_target"])
    payload = sum(c.stored_bits() for lp in plan.layers for c in (lp.uniform, lp.codebook, lp.adapter)
                  if c is not None) // 8
    return {**t, "bytes": file_bytes, "within": file_bytes <= t["limit_bytes"],
            "achieved_ratio": t["float_bytes"] / file_bytes,
            "weight_bytes": int(payload), "overhead_bytes": int(file_bytes - payload),
            "overhead_share": (file_bytes - payload) / file_bytes}


def effective_bits(plan: Plan, layers: dict[str, nn.Module]) -> float:
    """All stored weight bits (grids, scales, zero points, adapters, codebooks; float32 for
    unplanned layers) per weight parameter of the Conv/Linear layers."""
    planned = {lp.name: lp for lp in plan.layers}
    total = params = 0
    for name, mod in layers.items():
        n = mod.weight.numel()
        params += n
        bits = planned[name].stored_bits() if name in planned else None
        total += 32 * n if bits is None else bits
        if name in planned and bits is None and planned[name].adapter is not None:
            total += planned[name].adapter.stored_bits()
    return total / max(params, 1)


def _batchnorm_notes(fused: nn.Module) -> list[str]:
    left = remaining_batchnorm(fused)
    if not left:
        return []
    return [f"{len(left)} BatchNorm layers could not be fused into a Conv (e.g. {left[0]}): they run as "
            "BatchNormalization nodes, and the weights before them were quantized without their scale"]


def _notes(plan: Plan, weight_layout: str) -> list[str]:
    if weight_layout == "decode":
        merged = " (CoRa adapters merged in)" if any(lp.adapter is not None for lp in plan.layers) else ""
        return [f"weights are decoded from their integer grids{merged} when ONNX Runtime loads "
                "the file (weight layout decode): small on disk, float weights in memory, float speed; "
                "--weight-layout qdq writes DequantizeLinear nodes instead."]
    if any(lp.uniform is not None and lp.uniform.bits <= 4 for lp in plan.layers):
        return ["ONNX Runtime has no 4-bit Conv kernel on CPU and does not fold DequantizeLinear at load: with weight "
                "layout qdq, INT4 weights are dequantized at each inference. latency 'quantized_folded' is the same "
                "file with session config session.disable_quant_qdq=1, which folds them at load."]
    return []


@dataclass(frozen=True, eq=False)
class FloatReference:
    """What every compressed variant of one model is compared with: the float model's logits on the
    validation images (in load order), their labels and top-1, the float (BN-fused) ONNX file,
    and the Conv/Linear weight parameter count (the denominator of bits per weight)."""

    logits: np.ndarray
    labels: np.ndarray
    top1: float
    onnx: bytes
    weight_params: int


def float_reference(model: nn.Module, val: str | Path, class_map: str | Path | None = None,
                    mean: Sequence[float] | str = IMAGENET_MEAN, std: Sequence[float] | str = IMAGENET_STD,
                    input_size: int = 224, *, crop_ratio: float = 1.0, batch_size: int = 32) -> FloatReference:
    """The float side of `quantize`'s verification, computed once: pass .logits to
    quantize(float_logits=...) with the same val folder and preprocessing."""
    pre = Preprocess(input_size=int(input_size), crop_ratio=crop_ratio, mean=parse_floats(mean, what="mean"),
                     std=parse_floats(std, what="std"))
    model = load_model(model)
    n_classes = num_classes(model, pre.input_size)
    cmap = load_class_map(class_map) if class_map is not None else None
    val_set = load_images(val, pre, labelled=True, class_map=cmap, num_classes=n_classes, what="validation folder")
    logits = predict_torch(model, val_set, batch_size, "PyTorch, float")
    fused = fuse_batchnorm(model)
    model_ir = export_onnx(fused, pre.input_size)
    meta = {"input_size": pre.input_size, "crop_ratio": pre.crop_ratio, "mean": list(pre.mean), "std": list(pre.std)}
    model_ir.metadata_props["cora_onnx.preprocess"] = json.dumps(meta)
    weight_params = sum(mod.weight.numel() for mod in quantizable_layers(fused).values())
    labels = val_set.labels
    return FloatReference(logits, labels, top1(logits, labels), onnx_bytes(model_ir), int(weight_params))
