"""The stages of `cora_onnx.quantize`, each usable alone (the tools/ scripts call them):

    check_options -> load_model -> load_data -> run_search -> export_quantized
        -> verify_quantized (cora_onnx.run.outcome) -> make_report -> write_outputs

`check_options` validates everything that does not need the model and returns an `Options`;
the other stages pass frozen results forward (`Data`, `Searched`, `Exported`). Verification,
the report and writing are in cora_onnx.run.outcome.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from cora_onnx.core.options import ADAPTER_LAYOUTS, Preprocess, RunOptions, weight_layout_for
from cora_onnx.onnx.data import ImageSet, load_class_map, load_images
from cora_onnx.core.budget import format_size
from cora_onnx.core.errors import CoraError, ModelError, SettingsError
from cora_onnx.torch.export import apply_plan_torch, export_program, fuse_batchnorm
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.torch.models import build_model, check_finite
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.onnx.sizes import finish
from cora_onnx.onnx.report import Activations
from cora_onnx.core.plan import LayerPlan, Plan, WeightFingerprint
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.torch.search import METHODS
from cora_onnx.onnx.verify import cpu_threads

__all__ = ["RunOptions", "Options", "Data", "Budget", "Searched", "Exported", "check_options", "make_settings",
           "load_model", "num_classes", "load_data", "map_layers", "rehearse", "size_budget", "run_search", "export_quantized",
           "integer_activations",
           "ADAPTER_LAYOUTS", "BRANCH_TIMING_CALIB"]

log = logging.getLogger(__name__)

BRANCH_TIMING_CALIB = 128  # calibration images for the branch-layout model that is only timed


@dataclass(frozen=True, eq=False)
class Options(RunOptions):
    """A quantize run's checked options: the run options (cora_onnx.core.options.RunOptions) with
    `bits` fitted to the integer-kernel width with act_bits, `threads` resolved, `out` set, and
    what they imply: settings (the method's validated settings), pre (the preprocessing),
    scheme / calib_settings (integer activations; None: float activations), merge_bits (the
    integer weight width the CoRa adapters are fused into at load with integer activations),
    weights ("decode" or "qdq": the weight layout written, core.options.weight_layout_for) and
    adapters ("merge": CoRa adapters merged into their Conv's weight at load, the integer one with
    merge_bits, else the float one; "branch": branch convolutions)."""

    settings: Any = None
    pre: Preprocess | None = None
    scheme: Any = None
    calib_settings: Any = None
    merge_bits: int | None = None
    weights: str = "decode"
    adapters: str = "branch"


def make_settings(method: str, bits: int, options: Mapping[str, Any]):
    """Validated settings of a search method; unknown options are a SettingsError."""
    if method not in METHODS:
        raise SettingsError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    cls = METHODS[method].settings
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise SettingsError(f"method {method} has no option {unknown[0]!r}; its options: {', '.join(sorted(fields))}")
    try:
        return cls(bits=bits, **options)
    except (TypeError, ValueError) as exc:  # a value of the wrong type inside a settings check
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"method {method}: an option has a value of the wrong type "
                            f"({str(exc).splitlines()[0]})") from None


def check_options(options: RunOptions | None = None, **keywords) -> Options:
    """Every check of a quantize run that needs neither the model nor the images: the run options
    (`options`, or built from `keywords` as cora_onnx.quantize takes them: RunOptions.of), the
    method and its settings (with --keep/--keep-bits/skip as its layer selection), and calib or
    val present. SettingsError on the first problem."""
    run = RunOptions.resolve(options, **keywords)
    method = run.search  # with a size target: auto, among the encodings of the method named
    if method not in METHODS or (run.method is not None and run.method not in METHODS):
        raise SettingsError(f"unknown method {run.method!r}; expected one of {', '.join(METHODS)}")
    if method == "auto" and run.size_target is None:
        raise SettingsError("method auto chooses every layer's encoding under a size target: give target_ratio "
                            "(--target-ratio R) or target_size (--target-size SIZE)")
    m = METHODS[method]
    fields = frozenset(f.name for f in dataclasses.fields(m.settings))
    if m.needs_calib and not run.calib:
        raise SettingsError(f"method {method} needs calibration images (calib=DIR)")
    if not run.calib and not run.val:
        raise SettingsError("give calib or val images: parity is measured on them")
    method_options = _with_selection(dict(run.method_options), run, m.settings)
    if method == "auto" and run.method not in (None, "auto"):
        from cora_onnx.torch.search.auto import METHOD_FAMILIES

        method_options.setdefault("families", METHOD_FAMILIES[run.method])
    bits, scheme, calib_settings = run.bits, None, None
    if run.act_bits is not None:
        from cora_onnx.onnx.calibrate import CalibSettings
        from cora_onnx.onnx.int8 import choose_scheme

        calib_settings = CalibSettings(method=run.act_calib)
        scheme = choose_scheme()
        bits, method_options = _fit_weight_bits(bits, method_options, scheme.weight_bits, fields)
    merge_bits = scheme.weight_bits if scheme is not None and run.adapter_layout in ("auto", "merge") else None
    weights = weight_layout_for(run.weight_layout, run.act_bits, run.out_format)
    adapters = "merge" if run.adapter_layout in ("auto", "merge") and (scheme is not None or weights == "decode") \
        else "branch"
    if "seed" in fields:
        method_options.setdefault("seed", run.seed)  # seeded searches follow --seed
    settings = make_settings(method, bits, method_options)
    given = {f.name: getattr(run, f.name) for f in dataclasses.fields(RunOptions)}
    return Options(**{**given, "bits": bits, "threads": run.threads or cpu_threads(),
                      "out": run.out if run.out is not None else Path("model.onnx")},
                   settings=settings, pre=run.preprocess, scheme=scheme, calib_settings=calib_settings,
                   merge_bits=merge_bits, weights=weights, adapters=adapters)


def _with_selection(method_options: dict, run: RunOptions, settings_cls: type) -> dict:
    """The method options with run.keep / keep_bits / skip (when given) as the layer selection."""
    if run.keep is None and run.keep_bits is None and not run.skip:
        return method_options
    from cora_onnx.torch.search.layers import LayerSelection, default_selection

    base = method_options.get("selection") or default_selection(settings_cls)
    method_options["selection"] = LayerSelection(keep=base.keep if run.keep is None else run.keep,
                                                 keep_bits=base.keep_bits if run.keep_bits is None else run.keep_bits,
                                                 skip=run.skip or base.skip)
    return method_options


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
        from cora_onnx.torch.search import LayerSelection

        options["selection"] = LayerSelection(keep_bits=min(LayerSelection().keep_bits, weight_bits))
    return bits, options


def load_model(model: nn.Module | str, weights: str | Path | None = None) -> nn.Module:
    """The model in eval mode, its values checked finite (ModelError otherwise): an nn.Module as
    it is, or an architecture name (torchvision, efficientnet_lite0, digits_cnn) built with the
    state_dict file `weights` (cora_onnx.torch.models.build_model)."""
    if isinstance(model, str):
        return build_model(model, weights)
    if weights is not None:
        raise SettingsError("weights are loaded with an architecture name; pass the nn.Module with its weights "
                            "already in it")
    model = model.eval()
    check_finite(model)
    return model


def num_classes(model: nn.Module, input_size: int) -> int:
    """The classes of a classifier (N x classes output on 3 x size x size input); ModelError else."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:
        raise ModelError(f"the model does not run on 3x{input_size}x{input_size} input: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    if out.dim() != 2:
        raise ModelError(f"expected a classifier with N x classes output, got shape {tuple(out.shape)}")
    return int(out.shape[1])


@dataclass(frozen=True, eq=False)
class Data:
    """The images of a run: calib (None without), val (labelled, None without), the classes."""

    calib: ImageSet | None
    val: ImageSet | None
    num_classes: int


def load_data(model: nn.Module, pre: Preprocess, calib=None, val=None, class_map: str | Path | None = None,
              float_logits: np.ndarray | None = None) -> Data:
    """Calibration and validation images for `model` (val labelled, through class_map when given;
    both may be a folder or a list of folders). float_logits, when given, must be (val images,
    classes): SettingsError otherwise."""
    n_classes = num_classes(model, pre.input_size)
    cmap = load_class_map(class_map) if class_map is not None else None
    val_set = load_images(val, pre, labelled=True, class_map=cmap, num_classes=n_classes, what="validation folder") \
        if val is not None else None
    calib_set = load_images(calib, pre, what="calibration folder") if calib is not None else None
    if float_logits is not None and (val_set is None or np.shape(float_logits) != (len(val_set), n_classes)):
        raise SettingsError(f"float_logits must have shape (validation images, classes) = "
                            f"({len(val_set) if val_set is not None else 0}, {n_classes}), got {np.shape(float_logits)}")
    return Data(calib_set, val_set, n_classes)


@dataclass(frozen=True, eq=False)
class Searched:
    """The search's result: the BatchNorm-fused model it ran on, the plan (with fingerprints of
    the fused weights and the preprocessing in its meta), its wall time, and the torch.onnx
    program of the fused float model (exported before the search to map its layers; None: export
    it again)."""

    fused: nn.Module
    plan: Plan
    seconds: float
    program: Any = None


def map_layers(fused: nn.Module, program, selection=None) -> None:
    """Before any search: every Conv/Linear of the fused model that a search would plan (all but
    `selection.skip`) must be found in the exported float graph by its weight's value (under its
    name, or transposed as a MatMul weight: passes.locate_weight). ModelError naming the first that
    is not, so a run fails in seconds, not after its search. Modules that do not run in eval mode
    are already out of the fused model (fuse_batchnorm)."""
    from passes import locate_weight

    skip = set(selection.skip) if selection is not None else set()
    graph = program.model.graph
    missing = [name for name, fp in _fingerprints(fused).items()
               if name not in skip and locate_weight(graph, f"{name}.weight", fp) is None]
    if missing:
        raise ModelError(f"{len(missing)} Conv/Linear layer(s) not found in the exported ONNX graph (e.g. {missing[0]}: "
                         f"the exporter rewrote its weight), so no plan could be applied to them; leave them in float "
                         f"with --skip {','.join(missing[:3])}{',...' if len(missing) > 3 else ''}")


def rehearse(fused: nn.Module, program, opts: Options) -> None:
    """Before any search: the plans opts.search may write (its Method's `rehearsal`: skeleton
    layers, zero-filled, with the fused weights' fingerprints), in the run's file layout, and the
    variants timed beside the first (_timing_variants), each applied to a copy of the exported float
    graph by the passes the export runs (cora_onnx.onnx.pipeline.apply_plan). A pass that refuses
    is a ModelError naming the first layer it refuses (_refused) and its message, so a run fails
    in seconds, not after its search. Integer activations are calibrated after the search and
    are not rehearsed."""
    rehearsal = METHODS[opts.search].rehearsal
    if rehearsal is None:
        return
    t0 = time.perf_counter()
    fingerprints = _fingerprints(fused)
    plans = [_file_layout(p.with_fingerprints(fingerprints), opts) for p in rehearsal(fused, opts.settings)]
    plans += list(_timing_variants(plans[0], opts).values())  # of the first: the others differ in their widths alone
    for plan in plans:
        exc = _refuses(program.model, plan)
        if exc is not None:
            lp, why = _refused(program.model, plan, exc)
            raise ModelError(f"the ONNX passes cannot write what method {opts.search} may plan for layer {lp.name} "
                             f"({_described(lp, plan)}; rehearsed before the search): {why}; leave it in float with "
                             f"--skip {lp.name}")
    log.info("rehearsal: %d skeleton plan(s) of %d layers written into the exported graph in %.1f s", len(plans),
             len(plans[0].layers), time.perf_counter() - t0)


def _refuses(model: ir.Model, plan: Plan) -> Exception | None:
    """The failure of applying `plan` to a copy of `model` (apply_plan), None when it applies."""
    try:
        apply_plan(ir.from_proto(ir.to_proto(model)), plan)
    except Exception as exc:  # any failure of a pass: the export after the search would fail the same way
        log.debug("rehearsal of %d layers refused", len(plan.layers), exc_info=True)
        return exc
    return None


def _refused(model: ir.Model, plan: Plan, exc: Exception) -> tuple[LayerPlan, str]:
    """(LayerPlan, the pass's message in one line) of a plan that `model` refuses with `exc`: the
    last layer of its shortest refused prefix, found by bisection (a few more copies, on failure only)."""
    lo, hi = 0, len(plan.layers)  # the first lo layers apply (none, at least), the first hi do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = _refuses(model, plan.replace(layers=plan.layers[:mid]))
        if found is None:
            lo = mid
        else:
            hi, exc = mid, found
    lp = plan.layers[hi - 1]
    return lp, _one_line(exc).removeprefix(f"layer {lp.name}: ")


def _one_line(exc: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _described(lp: LayerPlan, plan: Plan) -> str:
    """"a 4-bit grid, an adapter as branch convolutions, a corrected bias": what a layer's plan writes."""
    parts = [f"a codebook of d={lp.codebook.block_size}" if lp.codebook is not None else f"a {lp.uniform.bits}-bit grid"]
    if lp.adapter is not None:
        parts.append("an adapter" + (" as branch convolutions" if plan.adapter_layout == "branch" else " merged"))
    if lp.bias is not None or (lp.codebook is not None and lp.codebook.bias is not None):
        parts.append("a corrected bias")
    return ", ".join(parts)


@dataclass(frozen=True, eq=False)
class Budget:
    """A size target in bytes, measured before the search: the BatchNorm-fused model and its
    float export (the search and the export reuse both), the float file's bytes, the file's limit,
    the bytes of every encoding of every layer (cora_onnx.onnx.sizes.SizeTable) and the search
    settings with the byte budget of the layers (limit minus the fixed bytes) and those costs."""

    fused: nn.Module
    program: Any
    float_bytes: int
    limit: int
    table: Any
    settings: Any


def size_budget(model: nn.Module, opts: Options) -> Budget | None:
    """The Budget of opts.size_target (None without a target). SettingsError when the target is
    below the smallest file the model can be (every layer at its cheapest encoding), naming the
    smallest reachable ratio: before any image is read or any weight fitted."""
    target = opts.size_target
    if target is None:
        return None
    from cora_onnx.onnx.sizes import measure_costs, metadata_reserve
    from cora_onnx.torch.search.auto import layer_facts, menus_of

    t0 = time.perf_counter()
    pre = opts.pre
    fused = fuse_batchnorm(model, pre.input_size)
    program = export_program(fused, pre.input_size)
    map_layers(fused, program, getattr(opts.settings, "selection", None))
    meta = {"input_size": pre.input_size, "crop_ratio": pre.crop_ratio, "mean": list(pre.mean), "std": list(pre.std)}
    program.model.metadata_props["cora_onnx.preprocess"] = json.dumps(meta)
    float_bytes = len(onnx_bytes(program.model))
    layers = quantizable_layers(fused)
    menus = menus_of(fused, opts.settings)
    specs = {n: layer_facts(layers[n])[:2] for n in menus}
    try:  # every encoding the search may choose, written into the graph as a skeleton: the rehearsal of auto
        table = measure_costs(program.model, specs, menus, metadata_reserve(menus),
                              layout=_file_layout(Plan("auto", {}, ()), opts), fingerprints=_fingerprints(fused))
    except Exception as exc:  # any failure of a pass: the export after the search would fail the same way
        raise ModelError(f"the ONNX passes cannot write the encodings a size target may choose (measured before the "
                         f"search on skeleton plans): {_one_line(exc)}") from exc
    limit = target.limit(float_bytes)
    least = table.least()
    what = f"{target.describe()} ({limit:,} bytes, the float file being {float_bytes:,})"
    if least > limit:
        raise SettingsError(f"size target {what} is out of reach: the smallest file of this model is {least:,} bytes "
                            f"({float_bytes / least:.2f}x), every layer at its smallest encoding and {table.fixed:,} "
                            f"bytes of graph, names and metadata; ask for {float_bytes / least:.2f}x or less")
    settings = dataclasses.replace(opts.settings, budget_bytes=limit - table.fixed, costs=table.costs)
    log.info("size target %s: %s for the layers' encodings (%s fixed; smallest file %s, %.2fx), measured in %.1f s",
             what, format_size(limit - table.fixed), format_size(table.fixed), format_size(least), float_bytes / least,
             time.perf_counter() - t0)
    return Budget(fused, program, float_bytes, limit, table, settings)


def run_search(model: nn.Module, opts: Options, calib: ImageSet | None, budget: Budget | None = None) -> Searched:
    """Fold BatchNorm, export the fused float model, check that every layer to plan is found in it
    (map_layers) and that the passes can write what the search may plan (rehearse), seed torch
    with opts.seed, run opts.search's search on the fused model. With a size target, `budget`
    (size_budget) brings the fused model, its export and the settings."""
    torch.manual_seed(opts.seed)
    pre = opts.pre
    if budget is None:
        fused = fuse_batchnorm(model, pre.input_size)
        program = export_program(fused, pre.input_size)
        map_layers(fused, program, getattr(opts.settings, "selection", None))
        rehearse(fused, program, opts)
    else:  # size_budget wrote every encoding the search may choose into the graph already (measure_costs)
        fused, program = budget.fused, budget.program
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    plan = METHODS[opts.search].run(fused, opts.settings if budget is None else budget.settings, calib)
    seconds = time.perf_counter() - t0
    plan = plan.with_fingerprints(_fingerprints(fused))  # the passes check them, and find renamed weights by them
    extra = {} if budget is None else {"size_target": _target_meta(opts.size_target, budget, _file_layout(plan, opts))}
    plan = Plan(plan.method, plan.settings, plan.layers,
                meta={**plan.meta, "model": opts.model_name or type(model).__name__, "input_size": pre.input_size,
                      "crop_ratio": pre.crop_ratio, "mean": list(pre.mean), "std": list(pre.std), **extra})
    log.info("search done in %.1f s: %d layers planned", seconds, len(plan.layers))
    return Searched(fused, plan, seconds, program)


def _fingerprints(fused: nn.Module) -> dict[str, WeightFingerprint]:
    """Layer name -> the fingerprint of its float weight, for every Conv/Linear of the BatchNorm-fused
    model (the weights plans are made from)."""
    return {name: WeightFingerprint.of(mod.weight.detach().cpu().numpy()) for name, mod in quantizable_layers(fused).items()}


def _file_layout(plan: Plan, opts: Options) -> Plan:
    """`plan` with the merge width and weight and adapter layouts its file is written with."""
    return plan.replace(merge_bits=opts.merge_bits, weight_layout=opts.weights, adapter_layout=opts.adapters)


def _target_meta(target, budget: Budget, plan: Plan) -> dict:
    """What the plan records of its size target: the limit, the fixed bytes counted in the budget,
    the file predicted from the chosen encodings alone and the name width of its compact export
    (cora_onnx.onnx.sizes)."""
    from cora_onnx.onnx.sizes import predicted_bytes

    predicted = predicted_bytes(budget.program.model, plan, budget.table.width)
    return {**target.to_json(), "float_bytes": budget.float_bytes, "limit_bytes": budget.limit,
            "fixed_bytes": budget.table.fixed, "predicted_bytes": predicted,
            "smallest_bytes": budget.table.least(), "names_width": budget.table.width,
            "measure_seconds": budget.table.seconds}


@dataclass(frozen=True, eq=False)
class Exported:
    """The float and quantized ONNX files (bytes), the PyTorch model the quantized file is checked
    against (with integer activations: their simulation), extra variants timed alongside
    (name -> bytes), the activation report (None with float activations), and the plan as the
    file holds it (the searched plan with the adapter merge width and the integer activations:
    cora_onnx.onnx.pipeline.apply_plan of it on the same export rebuilds quant_bytes)."""

    float_bytes: bytes
    quant_bytes: bytes
    qmodel: nn.Module
    extra: dict
    act_report: Activations | None
    plan: Plan | None = None


def export_quantized(searched: Searched, opts: Options, calib: ImageSet | None) -> Exported:
    """Export the fused model, apply the plan (passes/), and with integer activations calibrate
    them and write them into the plan and the graph. Models with adapters also get their variants
    without adapters (and with adapters as branches when they are fused) for the latency table."""
    fused, scheme = searched.fused, opts.scheme
    plan = _file_layout(searched.plan, opts).replace(activations=None)
    program = searched.program if searched.program is not None else export_program(fused, opts.pre.input_size)
    model_ir = program.model
    model_ir.metadata_props["cora_onnx.preprocess"] = json.dumps(plan.meta_preprocess())
    float_bytes = onnx_bytes(model_ir)
    extra = {}
    variants = _timing_variants(plan, opts)
    adapted = bool(variants)
    bare = variants.get("quantized_no_adapters")
    if bare is not None:  # the same model without its branches, timed alongside
        # with merge_bits, weights with group-wise scales are re-quantized per channel (integer kernels)
        bare_ir = apply_plan(ir.from_proto(ir.to_proto(model_ir)), bare)
        extra["quantized_no_adapters"] = onnx_bytes(bare_ir) if scheme is None else \
            integer_activations(bare_ir, program, apply_plan_torch(fused, bare, opts.merge_bits), calib, scheme,
                                opts.calib_settings, opts.threads)[0]
    branches = variants.get("quantized_branches")
    if branches is not None:  # and with the adapters as branch convolutions (latency only)
        branch_ir = apply_plan(ir.from_proto(ir.to_proto(model_ir)), branches)
        extra["quantized_branches"] = onnx_bytes(branch_ir) if scheme is None else integer_activations(
            branch_ir, program, apply_plan_torch(fused, branches), calib.subset(BRANCH_TIMING_CALIB, opts.seed), scheme,
            opts.calib_settings, opts.threads)[0]
    qmodel = apply_plan_torch(fused, plan, opts.merge_bits)
    act_report = None
    if scheme is None:
        quant_bytes = onnx_bytes(finish(apply_plan(model_ir, plan), plan))
        _check_size(quant_bytes, plan)
    else:
        quant_bytes, qmodel, act_report, act = integer_activations(apply_plan(model_ir, plan), program, qmodel,
                                                                   calib, scheme, opts.calib_settings, opts.threads)
        plan = plan.replace(activations=act)
        if adapted:
            act_report = dataclasses.replace(act_report, adapter_layout=opts.adapters)
    return Exported(float_bytes, quant_bytes, qmodel, extra, act_report, plan)


def _timing_variants(plan: Plan, opts: Options) -> dict[str, Plan]:
    """The plans of the files export_quantized times beside `plan` (in its file layout) when it has
    adapters: without them ("quantized_no_adapters"), and when they are merged, with them as
    branch convolutions ("quantized_branches")."""
    if not any(lp.adapter is not None for lp in plan.layers):
        return {}
    out = {"quantized_no_adapters": plan.replace(layers=tuple(dataclasses.replace(lp, adapter=None)
                                                                for lp in plan.layers))}
    if opts.adapters == "merge":
        out["quantized_branches"] = plan.replace(merge_bits=None, adapter_layout="branch")
    return out


def _check_size(data: bytes, plan: Plan) -> None:
    """A file over its size target is never handed over (CoraError: a defect of the size measure)."""
    target = plan.meta.get("size_target")
    if target and len(data) > target["limit_bytes"]:
        raise CoraError(f"the file is {len(data):,} bytes, over its size target of {target['limit_bytes']:,} bytes "
                        f"(predicted {target['predicted_bytes']:,}): not written")


def integer_activations(model_ir, program, qmodel, calib_set: ImageSet, scheme, calib_settings, threads: int,
                        histograms: dict | None = None):
    """Calibrate the activations of the weight-quantized graph `model_ir` and write them into it
    (in place; activation QDQ, cleanup: cora_onnx.onnx.pipeline.apply_activations, as apply_plan
    does for a saved plan); returns (bytes, the PyTorch model to check them against, activation
    report, the plan's ActivationPlan). program: the torch.onnx program of the float model
    (export_program), whose exported graph the simulation of integer activations runs.
    histograms: activation histograms of model_ir already collected on calib_set
    (cora_onnx.onnx.int8.activation_histograms), so several range methods share one pass."""
    from cora_onnx.onnx.int8 import activation_plan, activation_report
    from cora_onnx.onnx.pipeline import apply_activations
    from cora_onnx.torch.verify import simulation

    t0 = time.perf_counter()
    act = activation_plan(model_ir, calib_set, scheme, calib_settings, threads, histograms)
    pass_report = apply_activations(model_ir, act)
    data = onnx_bytes(model_ir)
    # adapter branches exist only in the ONNX graph (LowRankBranchPass): parity is then against the
    # PyTorch model with the same weights and float activations, which is looser
    sim = simulation(program, qmodel, data)
    if sim is qmodel:
        log.info("adapter branches: parity is against the PyTorch model with float activations")
    report = dataclasses.replace(
        activation_report(pass_report, calib_set, scheme, calib_settings, data, time.perf_counter() - t0),
        parity_reference="PyTorch simulation of the integer activations" if sim is not qmodel else
        "PyTorch with float activations (the simulation does not cover adapter branches)")
    kernels = report.onnxruntime_kernels
    if kernels["float_compute"]:
        log.warning("%d Conv/Gemm/MatMul nodes still run as float kernels in ONNX Runtime", kernels["float_compute"])
    return data, sim, report, act
