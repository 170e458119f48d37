"""The Python API: one call runs search -> export -> verify and returns the report."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, Preprocess, load_class_map, load_images, parse_floats
from .errors import ModelError, ParityError, SettingsError
from .export import AdaptedConv, apply_plan_torch, export_onnx, export_program, fuse_batchnorm, remaining_batchnorm
from .io import atomic_write, check_output_path
from .modelfile import onnx_bytes
from .models import check_finite
from .parity import PARITY_LIMITS, failed_path, first_divergent_layer, parity_failure, reference_kind
from .pipeline import apply_plan
from .plan import Plan
from .quantizers import quantizable_layers
from .report import environment, write_report
from .search import METHODS
from .verify import cpu_threads, fidelity, measure_latency, parity, predict_onnx, session, size_breakdown, top1
from .verify_torch import predict_torch

__all__ = ["QuantizeResult", "quantize", "make_settings", "export_plan", "effective_bits", "FloatReference",
           "float_reference", "failed_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class QuantizeResult:
    report: dict
    plan: Plan
    onnx_path: Path
    float_model: nn.Module
    quantized_model: nn.Module


def make_settings(method: str, bits: int, options: dict[str, Any]):
    """Validated settings of a search method; unknown options are a SettingsError."""
    if method not in METHODS:
        raise SettingsError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    cls = METHODS[method].settings
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise SettingsError(f"method {method} has no option {unknown[0]!r}; its options: {', '.join(sorted(fields))}")
    return cls(bits=bits, **options)


def _num_classes(model: nn.Module, input_size: int) -> int:
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:
        raise ModelError(f"the model does not run on 3x{input_size}x{input_size} input: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    if out.dim() != 2:
        raise ModelError(f"expected a classifier with N x classes output, got shape {tuple(out.shape)}")
    return int(out.shape[1])


def quantize(model: nn.Module, calib: str | Path | Sequence[str | Path] | None = None,
             val: str | Path | Sequence[str | Path] | None = None,
             class_map: str | Path | None = None, bits: int = 4, method: str = "rtn",
             out: str | Path = "model.onnx", mean: Sequence[float] | str = IMAGENET_MEAN,
             std: Sequence[float] | str = IMAGENET_STD, input_size: int = 224, *, crop_ratio: float = 1.0,
             report: str | Path | None = None, plan_out: str | Path | None = None,
             float_out: str | Path | None = None, model_name: str | None = None, batch_size: int = 32,
             parity_images: int = 1000, latency_runs: int = 30, latency_batch: int | None = None,
             threads: int | None = None, seed: int = 0, act_bits: int | None = None, act_calib: str = "minmax",
             out_format: str = "onnx", adapter_layout: str = "auto", float_logits: np.ndarray | None = None,
             **method_options) -> QuantizeResult:
    """Quantize `model` with `method`, export to ONNX at `out`, verify in ONNX Runtime.

    calib: folder of calibration images, or a list of folders whose images are mixed (flat or
    per class; needed by data-driven methods, and used for parity when val is None); val: labelled
    folder (one folder per class), or a list of them, for top-1; class_map: JSON of folder name ->
    class index when val's folders are a subset of the classes (not needed when they are ImageNet
    WordNet ids and the model has 1000 classes: the built-in map applies, see cora_onnx.data).
    act_bits: 8 for integer activations (static, calibrated on calib with act_calib = "minmax",
    "percentile" or "mse"; weights then use the CPU's integer-kernel width, see
    cora_onnx.int8.choose_scheme); None keeps float activations. out_format: "onnx" or "ort"
    (ONNX Runtime's ORT format, written by onnxruntime's own converter). adapter_layout (CoRa):
    "branch" exports each adapter as Conv(A) -> Conv(B) -> Add beside its Conv; "merge" (integer
    activations only) stores the same factors but merges them into the Conv's integer weight when
    ONNX Runtime loads the model, so the branches cost no inference time; "auto": merge with
    act_bits, branch without. float_logits: the float model's logits on val's images, computed once
    elsewhere (see `float_reference`; a sweep shares them between its points) instead of here.
    Returns a QuantizeResult whose .report is the dict also written to `report` (JSON), with
    "verified": true. Raises ParityError when ONNX Runtime disagrees with the PyTorch quantized
    model beyond cora_onnx.parity.PARITY_LIMITS: the model is then kept as NAME.failed.onnx (never
    under `out`) and the report is still written, with "verified": false.
    """
    scheme = None
    fields = frozenset(f.name for f in dataclasses.fields(METHODS[method].settings)) if method in METHODS \
        else frozenset()
    check_run_options(act_bits=act_bits, act_calib=act_calib, adapter_layout=adapter_layout, out_format=out_format,
                      latency_runs=latency_runs, has_calib=calib is not None)
    if act_bits is not None:
        from .calibrate import CalibSettings
        from .int8 import choose_scheme

        calib_settings = CalibSettings(method=act_calib)
        scheme = choose_scheme()
        bits, method_options = _fit_weight_bits(bits, method_options, scheme.weight_bits, fields)
    merge_bits = scheme.weight_bits if scheme is not None and adapter_layout in ("auto", "merge") else None
    if "seed" in fields:
        method_options.setdefault("seed", seed)  # seeded searches follow --seed
    settings = make_settings(method, bits, method_options)
    m = METHODS[method]
    outputs = [(out, "output model")] + [(p, w) for p, w in ((report, "report"), (plan_out, "plan"),
                                                              (float_out, "float model")) if p is not None]
    for p, what in outputs:
        check_output_path(p, what)
    if m.needs_calib and calib is None:
        raise SettingsError(f"method {method} needs calibration images (calib=DIR)")
    if calib is None and val is None:
        raise SettingsError("give calib or val images: parity is measured on them")
    pre = Preprocess(input_size=int(input_size), crop_ratio=crop_ratio, mean=parse_floats(mean, what="mean"),
                     std=parse_floats(std, what="std"))
    threads = threads or cpu_threads()
    torch.manual_seed(seed)
    model = model.eval()
    check_finite(model)
    n_classes = _num_classes(model, pre.input_size)
    cmap = load_class_map(class_map) if class_map is not None else None
    val_set = load_images(val, pre, labelled=True, class_map=cmap, num_classes=n_classes, what="validation folder") \
        if val is not None else None
    calib_set = load_images(calib, pre, what="calibration folder") if calib is not None else None
    if float_logits is not None and (val_set is None or np.shape(float_logits) != (len(val_set), n_classes)):
        raise SettingsError(f"float_logits must have shape (validation images, classes) = "
                            f"({len(val_set) if val_set is not None else 0}, {n_classes}), got {np.shape(float_logits)}")

    fused = fuse_batchnorm(model, pre.input_size)
    t0 = time.perf_counter()
    plan = m.run(fused, settings, calib_set)
    search_seconds = time.perf_counter() - t0
    weights = {name: mod.weight.detach().cpu().numpy() for name, mod in quantizable_layers(fused).items()}
    plan = Plan(plan.method, plan.settings, plan.with_fingerprints(weights).layers,
                meta={**plan.meta, "model": model_name or type(model).__name__, "input_size": pre.input_size,
                      "crop_ratio": pre.crop_ratio, "mean": list(pre.mean), "std": list(pre.std)})
    log.info("search done in %.1f s: %d layers planned", search_seconds, len(plan.layers))

    program = export_program(fused, pre.input_size)
    model_ir = program.model
    model_ir.metadata_props["cora_onnx.preprocess"] = json.dumps(plan.meta_preprocess())
    float_bytes = onnx_bytes(model_ir)
    extra = {}
    adapted = any(lp.adapter is not None for lp in plan.layers)
    if adapted:  # the same model without its branches, timed alongside
        bare = Plan(plan.method, plan.settings, tuple(dataclasses.replace(lp, adapter=None) for lp in plan.layers))
        bare_ir = apply_plan(ir.from_proto(ir.to_proto(model_ir)), bare)
        extra["quantized_no_adapters"] = onnx_bytes(bare_ir) if scheme is None else \
            _integer_activations(bare_ir, program, apply_plan_torch(fused, bare), calib_set, scheme,
                                 calib_settings, threads)[0]
    if adapted and merge_bits is not None:  # and with the adapters as branch convolutions (latency only)
        branch_ir = apply_plan(ir.from_proto(ir.to_proto(model_ir)), plan)
        extra["quantized_branches"] = _integer_activations(
            branch_ir, program, apply_plan_torch(fused, plan), calib_set.subset(BRANCH_TIMING_CALIB, seed), scheme,
            calib_settings, threads)[0]
    qmodel = apply_plan_torch(fused, plan, merge_bits)
    act_report = None
    if scheme is None:
        quant_bytes = onnx_bytes(apply_plan(model_ir, plan))
    else:
        quant_bytes, qmodel, act_report = _integer_activations(apply_plan(model_ir, plan, merge_bits), program, qmodel,
                                                               calib_set, scheme, calib_settings, threads)
        if adapted:
            act_report["adapter_layout"] = "merge" if merge_bits is not None else "branch"

    rep, probe = _verify(model, qmodel, float_bytes, quant_bytes, val_set, calib_set, batch_size, parity_images,
                         latency_runs, latency_batch, threads, seed, pre, fold=scheme is None, extra=extra,
                         float_logits=float_logits)
    kind = reference_kind(scheme is not None, qmodel)
    failure = parity_failure(rep["parity"], kind)
    rep["parity"].update(reference=kind, limits=dataclasses.asdict(PARITY_LIMITS[kind]))
    qlayers = quantizable_layers(fused)
    weight_params = sum(mod.weight.numel() for mod in qlayers.values())
    report_dict = {
        "model": plan.meta["model"], "method": method, "bits": bits, "onnx_path": str(out),
        "onnx_bytes": len(quant_bytes), "float_onnx_bytes": len(float_bytes),
        "compression_ratio": len(float_bytes) / len(quant_bytes),
        "weight_params": weight_params, "effective_bits": effective_bits(plan, qlayers),
        **rep, "search_seconds": search_seconds,
        "settings": plan.settings,
        "layers": [{"name": lp.name, "bits": lp.uniform.bits if lp.uniform else None, **dict(lp.info)}
                   for lp in plan.layers],
        "preprocess": {"input_size": pre.input_size, "crop_ratio": pre.crop_ratio, "mean": list(pre.mean),
                       "std": list(pre.std)},
        "images": {"calib": len(calib_set) if calib_set is not None else 0,
                   "val": len(val_set) if val_set is not None else 0},
        "environment": environment(threads),
        "notes": (_notes(plan) if scheme is None else []) + _batchnorm_notes(fused),
        **(m.report(plan) if m.report is not None else {}),
        **({"activations": act_report} if act_report is not None else {}),
        "verified": failure is None,
    }
    if failure is not None:
        report_dict["file_bits_per_weight"] = len(quant_bytes) * 8 / max(weight_params, 1)
        report_dict["float_file_bits_per_weight"] = len(float_bytes) * 8 / max(weight_params, 1)
        _parity_failed(failure, rep["parity"], kind, quant_bytes, qmodel, list(qlayers), probe, threads, out,
                       report_dict, report, plan, plan_out, float_bytes, float_out)
    file_bytes = quant_bytes
    if out_format == "ort":
        from .ort_format import to_ort

        file_bytes, report_dict["ort_format"] = to_ort(quant_bytes)
        if len(file_bytes) > 1.05 * len(quant_bytes):
            report_dict["notes"].append(
                f"the ORT format file ({len(file_bytes) / 1e6:.2f} MB) is larger than the ONNX file "
                f"({len(quant_bytes) / 1e6:.2f} MB): ONNX Runtime's optimizer decodes packed low-bit grids (and "
                f"Casts of INT4 grids) at conversion and stores the 8-bit result")
    report_dict["file_bits_per_weight"] = len(file_bytes) * 8 / max(weight_params, 1)
    report_dict["float_file_bits_per_weight"] = len(float_bytes) * 8 / max(weight_params, 1)
    atomic_write(out, lambda f: f.write(file_bytes))
    _write_side_outputs(float_out, float_bytes, plan_out, plan, report, report_dict)
    return QuantizeResult(report_dict, plan, Path(out), model, qmodel)


PROBE_IMAGES = 8  # images on which a failed parity check compares the layers' outputs


def _parity_failed(failure: str, par: dict, kind: str, quant_bytes: bytes, qmodel: nn.Module, layers: list[str],
                   probe: torch.Tensor, threads: int, out, report_dict: dict, report, plan: Plan, plan_out, float_bytes,
                   float_out) -> None:
    """Keep the model as NAME.failed.onnx (never under `out`), write the report with verified false
    (and the plan and float model when asked for), and raise ParityError naming the first layer
    whose output diverges."""
    try:
        where = first_divergent_layer(quant_bytes, qmodel, layers, probe, kind, threads)
    except Exception as exc:  # the diagnosis must not hide the failure itself
        log.warning("could not compare the layers' outputs: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
        where = None
    if where is None:
        located = "no layer output could be compared"
    elif where[2]:
        located = f"first diverging layer: {where[0]} (relative error {where[1]:.3g} on {len(probe)} images)"
    else:
        located = f"no single layer diverges; largest layer error at {where[0]} ({where[1]:.3g})"
    failed = failed_path(out)
    atomic_write(failed, lambda f: f.write(quant_bytes))
    msg = (f"ONNX Runtime disagrees with the PyTorch model on {par['images']} images: {failure}; {located}; "
           f"the model was not written to {out}, it is kept as {failed} for inspection")
    report_dict.update(onnx_path=str(failed), parity_error=msg,
                       parity_layer=None if where is None else {"layer": where[0], "relative_error": where[1],
                                                                "diverged": where[2]})
    _write_side_outputs(float_out, float_bytes, plan_out, plan, report, report_dict)
    raise ParityError(msg)


def _write_side_outputs(float_out, float_bytes: bytes, plan_out, plan: Plan, report, report_dict: dict) -> None:
    """The float model, the plan and the report, each when asked for."""
    if float_out is not None:
        atomic_write(float_out, lambda f: f.write(float_bytes))
    if plan_out is not None:
        plan.save(plan_out)
    if report is not None:
        write_report(report_dict, report)




ADAPTER_LAYOUTS = ("auto", "branch", "merge")


def check_run_options(*, act_bits=None, act_calib: str = "minmax", adapter_layout: str = "auto",
                      out_format: str = "onnx", latency_runs: int = 30, has_calib: bool = True) -> None:
    """SettingsError for quantize's options that are not the method's own (quantize calls it first;
    sweeps call it before any job starts)."""
    from .calibrate import CALIB_METHODS
    from .int8 import ACT_BITS

    if act_bits is not None:
        if act_bits not in ACT_BITS:
            raise SettingsError(f"act_bits must be one of {', '.join(map(str, ACT_BITS))} (or None for float "
                                f"activations), got {act_bits!r}")
        if not has_calib:
            raise SettingsError("integer activations (act_bits=8) need calibration images (calib=DIR)")
        if act_calib not in CALIB_METHODS:
            raise SettingsError(f"act_calib must be one of {', '.join(CALIB_METHODS)}, got {act_calib!r}")
    if adapter_layout not in ADAPTER_LAYOUTS:
        raise SettingsError(f"adapter layout must be one of {', '.join(ADAPTER_LAYOUTS)}, got {adapter_layout!r}")
    if adapter_layout == "merge" and act_bits is None:
        raise SettingsError("adapter layout merge needs integer activations (act_bits=8): it merges the adapters "
                            "into integer weights")
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, int) or latency_runs < 0:
        raise SettingsError(f"latency runs must be >= 0 (0 skips the timing), got {latency_runs}")
    if out_format not in ("onnx", "ort"):
        raise SettingsError(f"output format must be onnx or ort, got {out_format!r}")
BRANCH_TIMING_CALIB = 128  # calibration images for the branch-layout model that is only timed


def _fit_weight_bits(bits: int, options: dict, weight_bits: int, fields: frozenset = frozenset()) -> tuple[int, dict]:
    """Cap the weight grids (target and kept layers, and CoRa's adapters unless float) at the width
    the CPU's integer kernels take. fields: the method's settings fields."""
    options = dict(options)
    if bits > weight_bits:
        log.info("integer kernels on this CPU take %d-bit weights: using %d instead of %d bits", weight_bits,
                 weight_bits, bits)
        bits = weight_bits
    if "adapter_bits" in fields and options.get("adapter_bits", 8) > weight_bits:  # CoRa's branches: integer convs too
        options["adapter_bits"] = weight_bits
    sel = options.get("selection")
    if sel is not None and sel.keep_bits > weight_bits:
        options["selection"] = dataclasses.replace(sel, keep_bits=weight_bits)
    elif sel is None:
        from .search import LayerSelection

        options["selection"] = LayerSelection(keep_bits=min(LayerSelection().keep_bits, weight_bits))
    return bits, options


def _integer_activations(model_ir, program, qmodel, calib_set: ImageSet, scheme, calib_settings, threads: int):
    """Activation QDQ on the weight-quantized graph; returns (bytes, PyTorch simulation, report)."""
    import onnx_ir as ir

    from .int8 import add_activation_qdq, integer_kernels
    from .pipeline import cleanup_passes
    from .simulate import ActivationQuantSim

    t0 = time.perf_counter()
    ranges, qparams, pass_report = add_activation_qdq(model_ir, calib_set, scheme, calib_settings, threads)
    ir.passes.PassManager(cleanup_passes())(model_ir)
    data = onnx_bytes(model_ir)
    kernels = integer_kernels(data)
    if any(isinstance(m, AdaptedConv) for m in qmodel.modules()):
        # the simulation runs the exported program of the model without branches: adapter branches
        # exist only in the ONNX graph (LowRankBranchPass). Parity is then against the PyTorch model
        # with the same weights and float activations, which is looser.
        log.info("adapter branches: parity is against the PyTorch model with float activations")
        sim = qmodel
    else:
        sim = ActivationQuantSim(program, qmodel, qparams, scheme.act_range)
    report = {"bits": 8, "calibration": calib_settings.method, "calib_images": len(calib_set),
              "calib_seconds": time.perf_counter() - t0, "scheme": scheme.to_json(),
              "integer_nodes": len(pass_report["integer_nodes"]), "float_nodes": pass_report["float_nodes"],
              "activation_tensors": pass_report["activation_tensors"],
              "absorbed_activations": pass_report["absorbed_activations"],
              "onnxruntime_kernels": kernels,
              "parity_reference": "PyTorch simulation of the integer activations" if sim is not qmodel else
              "PyTorch with float activations (the simulation does not cover adapter branches)"}
    if kernels["float_compute"]:
        log.warning("%d Conv/Gemm/MatMul nodes still run as float kernels in ONNX Runtime", kernels["float_compute"])
    return data, sim, report


def _verify(model, qmodel, float_bytes: bytes, quant_bytes: bytes, val_set: ImageSet | None,
            calib_set: ImageSet | None, batch_size: int, parity_images: int, latency_runs: int,
            latency_batch: int | None, threads: int, seed: int, pre: Preprocess, fold: bool = True,
            extra: dict | None = None, float_logits: np.ndarray | None = None) -> tuple[dict, torch.Tensor]:
    """The verification figures, and the (normalized) parity images to compare layer outputs on."""
    qsess = session(quant_bytes, threads=threads)
    t1 = {"float": None, "quantized_torch": None, "quantized_onnxruntime": None}
    fid = None
    if val_set is not None:
        pset = val_set
        ort_logits = predict_onnx(qsess, val_set, batch_size, "ONNX Runtime, quantized")
        q_logits = predict_torch(qmodel, val_set, batch_size, "PyTorch, quantized")
        f_logits = predict_torch(model, val_set, batch_size, "PyTorch, float") if float_logits is None else \
            np.asarray(float_logits, dtype=np.float32)
        t1 = {"float": top1(f_logits, val_set.labels), "quantized_torch": top1(q_logits, val_set.labels),
              "quantized_onnxruntime": top1(ort_logits, val_set.labels)}
        fid = fidelity(ort_logits, f_logits)
    else:
        pset = calib_set.subset(parity_images, seed)
        ort_logits = predict_onnx(qsess, pset, batch_size, "ONNX Runtime, quantized")
        q_logits = predict_torch(qmodel, pset, batch_size, "PyTorch, quantized")
    par = parity(ort_logits, q_logits)
    # the images a failed check compares layer by layer: those the two runs disagree on first
    order = np.argsort((ort_logits.argmax(1) == q_logits.argmax(1)).astype(np.int8), kind="stable")[:PROBE_IMAGES]
    probe = torch.from_numpy(pset.preprocess.normalize(pset.images[np.sort(order)]))
    shape = (3, pre.input_size, pre.input_size)
    batches = (1,) if not latency_batch or latency_batch == 1 else (1, latency_batch)
    if latency_runs > 0:
        log.info("measuring latency (%d interleaved runs per model and batch size)", latency_runs)
    models = {"float": float_bytes, "quantized": qsess}
    if fold:  # load-time weight folding disables the integer fusions: only for weight-only models
        models["quantized_folded"] = session(quant_bytes, threads=threads, fold_weight_dq=True)
    models.update(extra or {})
    lat = measure_latency(models, shape, batch_sizes=batches, runs=latency_runs, threads=threads, seed=seed) \
        if latency_runs > 0 else {}  # 0: timing skipped
    return {
        "top1": t1, "parity": par,
        **({"fidelity_to_float": fid} if fid is not None else {}),
        "latency_ms": {k: lat[k]["batch_1"]["median_ms"] if k in lat else None
                       for k in ("float", "quantized", "quantized_folded", *(extra or {}))},
        "latency": lat,
        "size_breakdown": {"float": size_breakdown(float_bytes), "quantized": size_breakdown(quant_bytes)},
    }, probe


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


def _notes(plan: Plan) -> list[str]:
    notes = []
    if any(lp.uniform is not None and lp.uniform.bits <= 4 for lp in plan.layers):
        notes.append("ONNX Runtime has no 4-bit Conv kernel on CPU: INT4 weights save disk, not time (their "
                     "DequantizeLinear runs at each inference). latency 'quantized_folded' is the same file with "
                     "session config session.disable_quant_qdq=1, which folds them at load.")
    return notes


def export_plan(model: nn.Module, plan: Plan, out: str | Path, input_size: int | None = None) -> int:
    """Export `model` with a saved plan applied (no search, no verification); returns bytes written."""
    check_output_path(out, "output model")
    size = int(input_size or plan.meta.get("input_size", 224))
    fused = fuse_batchnorm(model.eval(), size)
    model_ir = export_onnx(fused, size)
    model_ir.metadata_props["cora_onnx.preprocess"] = json.dumps(plan.meta_preprocess())
    data = onnx_bytes(apply_plan(model_ir, plan))
    atomic_write(out, lambda f: f.write(data))
    return len(data)


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
    model = model.eval()
    check_finite(model)
    n_classes = _num_classes(model, pre.input_size)
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
