"""The Python API: one call runs search -> export -> verify and returns the report. The stages it
runs are in cora_onnx.run.stages and cora_onnx.run.outcome, each usable alone."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from torch import nn

from cora_onnx.torch.export import apply_plan_torch, export_program, fuse_batchnorm
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.core.errors import ConstantOutputError, ParityError, PlanError, SettingsError
from cora_onnx.core.files import atomic_write
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.run.outcome import FloatReference, effective_bits, float_reference, make_report, verify_quantized, write_outputs
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.onnx.sizes import finish
from cora_onnx.onnx.data import ImageSet
from cora_onnx.onnx.report import ExportReport, Outcome, QuantizeReport
from cora_onnx.onnx.verify import failed_path, judge, predict_onnx, session
from cora_onnx.core.plan import Plan
from cora_onnx.core.options import IMAGENET_MEAN, IMAGENET_STD, Preprocess, RunOptions, weight_layout_for
from cora_onnx.torch.verify import check_file, failure_message, simulation
from cora_onnx.core.progress import Phases
from cora_onnx.run.stages import (check_options, export_quantized, load_data, load_model, make_settings, run_search,
                                  size_budget)

__all__ = ["QuantizeResult", "quantize", "RunOptions", "make_settings", "export_plan", "effective_bits",
           "FloatReference", "float_reference", "failed_path"]


@dataclass(frozen=True, eq=False)
class QuantizeResult:
    report: QuantizeReport
    plan: Plan
    onnx_path: Path
    float_model: nn.Module
    quantized_model: nn.Module


def quantize(model: nn.Module, options: RunOptions | None = None, *, float_logits: np.ndarray | None = None,
             **keywords) -> QuantizeResult:
    """Quantize `model`, export to ONNX, verify in ONNX Runtime; the run is described by `options`
    (cora_onnx.RunOptions) or by keywords that build it in one call (RunOptions.of: its fields, and
    the method's settings by name, e.g. budget=, iters=, clip=; keywords given with `options`
    change those fields).

    The fields most used: calib: folder of calibration images, or a list of folders whose images
    are mixed (flat or per class; needed by data-driven methods, and used for parity when val is
    not given); val: labelled folder (one folder per class), or a list of them, for top-1;
    class_map: JSON of folder name -> class index when val's folders are a subset of the classes
    (not needed when they are ImageNet WordNet ids and the model has 1000 classes: the built-in map
    applies, see cora_onnx.onnx.data). method, bits, out (default model.onnx). act_bits: 8 for
    integer activations (static, calibrated on calib with act_calib = "minmax", "percentile" or
    "mse"; weights then use the CPU's integer-kernel width, see cora_onnx.onnx.int8.choose_scheme);
    None keeps float activations. out_format: "onnx" or "ort" (ONNX Runtime's ORT format, written
    by onnxruntime's own converter). weight_layout: "decode" writes each quantized weight as its
    integer grid decoded by standard ops (Cast, Mul) that ONNX Runtime folds when it loads the
    file, so a weight-only file runs at float speed in a plain session; "qdq" as DequantizeLinear
    nodes (what runtimes with low-bit kernels of their own read; ONNX Runtime runs them at each
    inference); "auto": decode for an ONNX file with float activations, qdq with act_bits (integer
    kernels need it) or out_format "ort" (its conversion would store decoded weights as float).
    adapter_layout (CoRa): "branch" exports each adapter as Conv(A) -> Conv(B) -> Add beside its
    Conv; "merge" stores the same factors but merges them into the Conv's weight when ONNX Runtime
    loads the model (the integer weight with act_bits, the float one with the decode layout), so
    the branches cost no inference time; "auto": merge with act_bits or the decode layout.
    target_ratio / target_size: the file at most the float ONNX file's size / target_ratio, or
    target_size bytes ("1.9MB"): every layer's encoding is then chosen under that budget (method
    None or "auto": grids, codebooks and adapters; "pq", "cora", "rtn": that method's encodings),
    and a target below the smallest file the model can be is a SettingsError before any image is
    read. method None: "rtn", or "auto" with a target.

    float_logits: the float model's logits on val's images, computed once elsewhere (see
    `float_reference`; a sweep shares them between its points) instead of here.
    Returns a QuantizeResult whose .report (cora_onnx.onnx.report.QuantizeReport, read by key like
    its JSON: result.report["parity"]) is also written to `report` (JSON), with "verified": true.
    Raises ParityError when ONNX Runtime disagrees with the PyTorch quantized model beyond
    cora_onnx.onnx.verify.PARITY_LIMITS (ConstantOutputError when its outputs do not depend on the
    input): the model is then kept as NAME.failed.onnx (never under `out`) and the report is still
    written, with "verified": false.

    The stages it runs in order, each usable alone: cora_onnx.run.stages.check_options -> load_model
    -> load_data -> run_search -> export_quantized, then cora_onnx.run.outcome.verify_quantized ->
    make_report -> write_outputs.
    """
    opts = check_options(options, **keywords)
    phases = Phases()
    with phases("load", desc="loading the model"):
        model = load_model(model)
    budget = None
    if opts.size_target is not None:  # measured, and refused when out of reach, before the images
        with phases("size_budget", desc="size target: the bytes of every layer's encodings"):
            budget = size_budget(model, opts)
    with phases("load", desc="loading the images"):
        data = load_data(model, opts.pre, opts.calib or None, opts.val or None, opts.class_map, float_logits)
    with phases("search", desc=f"{opts.search} search"):
        searched = run_search(model, opts, data.calib, budget)
    with phases("export", desc="export to ONNX and the plan's passes"):
        exported = export_quantized(searched, opts, data.calib)
    with phases("verify", desc="verification in ONNX Runtime against PyTorch"):
        verification = verify_quantized(model, exported, data, opts, float_logits)
    report = dataclasses.replace(make_report(searched, exported, verification, data, opts),
                                 phases={**phases.to_json(), "search_phases": searched.plan.meta.get("phases", {})})
    report = write_outputs(report, searched, exported, verification, opts)
    return QuantizeResult(report, exported.plan or searched.plan, opts.out, model, exported.qmodel)


EXPORT_CHECK_IMAGES = 16  # random images the exported file is checked on (export takes no image folder)


def export_plan(model: nn.Module, plan: Plan, out: str | Path | None = None, options: RunOptions | None = None,
                **keywords) -> ExportReport:
    """Export `model` with a saved plan applied, without searching: its layers, its adapter merge
    width and integer activations (calibrated ranges), its preprocessing in the file's metadata,
    so the file is the one `quantize` wrote with that plan. Checked before it is written, as
    `quantize` checks its file, against the PyTorch model with the plan applied (with integer
    activations their simulation; with adapters as branches and integer activations, which have
    no simulation, the same file without activation QDQ, exactly) on EXPORT_CHECK_IMAGES random
    images: ParityError / ConstantOutputError and the file kept as NAME.failed.onnx when it fails.
    The run options (`options` or keywords): out, input_size (default: the plan's), out_format,
    weight_layout (auto: the plan's; decode or qdq rewrite the plan's weights that way), threads,
    seed. PlanError when the model's (BatchNorm-fused) weights are not those the plan was made
    from. Returns the report (cora_onnx.onnx.report.ExportReport)."""
    opts = RunOptions.resolve(options, **keywords, **({"out": out} if out is not None else {}))
    if opts.out is None:
        raise SettingsError("export_plan needs an output path (out=)")
    if opts.weight_layout != "auto":
        plan = plan.replace(weight_layout=weight_layout_for(
            opts.weight_layout, None if plan.activations is None else 8, opts.out_format))
    size = int(opts.input_size or plan.meta.get("input_size", 224))
    fused = fuse_batchnorm(load_model(model), size)
    layers = quantizable_layers(fused)
    diff = plan.weight_mismatch({name: mod.weight.detach().cpu().numpy() for name, mod in layers.items()})
    if diff is not None:
        raise PlanError(f"these are not the weights the plan was made from: {diff}")
    program = export_program(fused, size)
    model_ir = program.model
    model_ir.metadata_props["cora_onnx.preprocess"] = json.dumps(plan.meta_preprocess())
    float_bytes = onnx_bytes(model_ir)
    twin_ir = ir.from_proto(ir.to_proto(model_ir)) if plan.activations is not None else None
    data = onnx_bytes(finish(apply_plan(model_ir, plan), plan))
    act = plan.activations
    weights = apply_plan_torch(fused, plan, plan.merge_bits)
    reference = weights if act is None else simulation(program, weights, data)
    checked = data
    if act is not None and reference is weights:
        # adapters as branches: no simulation of the branches, and on random images the file's
        # 8-bit activations are far from their calibrated ranges: the weights and branches are
        # checked exactly in the same file without activation QDQ (outputs: the file itself)
        checked = onnx_bytes(finish(apply_plan(twin_ir, plan.replace(activations=None)), plan))
    meta = plan.meta
    pre = Preprocess(input_size=size, crop_ratio=float(meta.get("crop_ratio", 1.0)),
                     mean=tuple(meta.get("mean", IMAGENET_MEAN)), std=tuple(meta.get("std", IMAGENET_STD)))
    rng = np.random.default_rng(opts.seed)
    images = ImageSet(rng.integers(0, 256, (EXPORT_CHECK_IMAGES, 3, size, size), dtype=np.uint8), None,
                      tuple(f"random {i}" for i in range(EXPORT_CHECK_IMAGES)), pre)
    check = check_file(checked, reference, images, act is not None and checked is data, batch_size=opts.batch_size,
                       threads=opts.threads)
    v = check.verdict
    if checked is not data and v.verified:  # the file itself: outputs that depend on the input
        v = judge(v.parity, check.kind, predict_onnx(session(data, threads=opts.threads), images, opts.batch_size))
    report = ExportReport(model=opts.model_name or plan.meta.get("model") or type(model).__name__, method=plan.method,
                          plan_layers=len(plan.layers), integer_activations=act is not None,
                          onnx_path=str(opts.out), onnx_bytes=len(data), float_onnx_bytes=len(float_bytes),
                          weight_params=sum(mod.weight.numel() for mod in layers.values()), parity=v.parity,
                          outcome=Outcome(verified=v.verified))
    if not v.verified:
        failed = failed_path(opts.out)
        msg, _ = failure_message(dataclasses.replace(check, verdict=v), checked, reference, list(layers),
                                 f"{opts.out} not written, the model is kept as {failed} for inspection",
                                 subject="the PyTorch model with the plan", images="random images",
                                 threads=opts.threads)
        atomic_write(failed, lambda f: f.write(data))
        raise (ConstantOutputError if v.constant_output else ParityError)(msg)
    if opts.out_format == "ort":
        from cora_onnx.onnx.ort_format import to_ort

        data = to_ort(data)[0]
    atomic_write(opts.out, lambda f: f.write(data))
    return dataclasses.replace(report, onnx_bytes=len(data))
