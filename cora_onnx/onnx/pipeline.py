"""The one place where pass pipelines are declared."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from passes import (ActivationQDQPass, AdapterMergePass, BiasUpdatePass, CodebookDecodePass, GroupScaleMergePass,
                    IntegerFormsPass, LowRankBranchPass, QuantScheme, StripExportMetadataPass, WeightDecodePass,
                    WeightNamesPass, WeightQDQPass)

from cora_onnx.core.errors import OnnxModelError
from cora_onnx.core.plan import ActivationPlan, Plan
from cora_onnx.core.progress import Progress

__all__ = ["cleanup_passes", "plan_pipeline", "activation_pipeline", "apply_plan", "apply_activations", "scheme_of"]


_INFRA_ERRORS = (ir.passes.PassError, ir.passes.PreconditionError, ir.passes.PostconditionError)


def cleanup_passes() -> list[ir.passes.PassBase]:
    """Unused nodes and initializers out, topological order, then the full ONNX checker."""
    return [
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
        common.TopologicalSortPass(),
        common.CheckerPass(full_check=True),
    ]


def plan_pipeline(plan: Plan, merge_bits: int | None = None, weight_layout: str | None = None,
                  adapter_layout: str | None = None) -> ir.passes.PassManager:
    """Passes that apply a Plan's layers to the float ONNX graph exported from the BN-fused
    model. The planned weights first get their module names back (WeightNamesPass: a Linear
    exported as a MatMul holds its weight transposed under a generated name); the passes that find
    layers by their float weight name run before WeightQDQPass replaces it. The exporter's per-node
    debug metadata (stack traces, FX text) is dropped from the compressed file.

    merge_bits, weight_layout, adapter_layout default to the plan's. weight_layout: "qdq" keeps
    the weight DequantizeLinear nodes (what integer kernels fuse); "decode" rewrites them as
    standard ops ONNX Runtime folds at load (WeightDecodePass), for float activations. CoRa
    adapters: "branch" exports them as branch convolutions (LowRankBranchPass); "merge" merges them
    into their Conv's weight at load time (AdapterMergePass): the integer weight of merge_bits (7
    or 8, for integer kernels), or the float weight when merge_bits is None; None: merge with
    merge_bits or the decode layout, branch otherwise."""
    merge_bits = plan.merge_bits if merge_bits is None else merge_bits
    weight_layout = weight_layout or plan.weight_layout
    adapter_layout = adapter_layout or plan.adapter_layout
    if weight_layout not in ("decode", "qdq"):
        raise ValueError(f"weight layout must be decode or qdq, got {weight_layout!r}")
    if adapter_layout is None:
        adapter_layout = "merge" if merge_bits is not None or weight_layout == "decode" else "branch"
    if adapter_layout not in ("branch", "merge") or (adapter_layout == "branch" and merge_bits is not None):
        raise ValueError(f"adapter layout must be branch (without merge_bits) or merge, got {adapter_layout!r}")
    if adapter_layout == "branch":
        adapters = [LowRankBranchPass(plan), WeightQDQPass(plan)]
    else:  # these write their layers' weights themselves; WeightQDQPass the others'
        merged = [AdapterMergePass(plan, merge_bits)] + \
            ([GroupScaleMergePass(plan, merge_bits)] if merge_bits is not None else [])
        adapters = [*merged, WeightQDQPass(plan, exclude={lp.name for p in merged for lp in p.layers})]
    return ir.passes.PassManager([WeightNamesPass(plan), BiasUpdatePass(plan), *adapters, CodebookDecodePass(plan),
                                  *([WeightDecodePass()] if weight_layout == "decode" else []),
                                  StripExportMetadataPass(), *cleanup_passes()])


def scheme_of(act: ActivationPlan) -> QuantScheme:
    return QuantScheme(act.act_dtype, act.weight_bits, act.reason)


def activation_pipeline(act: ActivationPlan, merged_bits: int | None = None) -> ir.passes.PassManager:
    """Static integer activations with the plan's calibrated ranges on a graph whose weights the
    plan pipeline already wrote (merged_bits: the plan's merge width; None: the scheme's): the float
    ops ONNX Runtime has integer kernels for in another form rewritten into it (IntegerFormsPass,
    which calibration ran first too: the ranges are of its tensors), then activation QDQ, then the
    weights of the kernels left in float decoded as ONNX Runtime folds them at load
    (WeightDecodePass keeps every weight of a QDQ group: those become integer kernels), so ONNX
    Runtime computes them in float as verified (a DequantizeLinear weight of a float MatMul is
    fused into MatMulNBits, which quantizes its input on the fly), then cleanup. Its second pass
    (ActivationQDQPass) keeps a report."""
    return ir.passes.PassManager([IntegerFormsPass(),
                                  ActivationQDQPass(act.ranges, scheme_of(act), weight_clip=act.weight_clip,
                                                    merged_bits=merged_bits),
                                  WeightDecodePass(), *cleanup_passes()])


def apply_plan(model: ir.Model, plan: Plan, merge_bits: int | None = None, weight_layout: str | None = None,
               adapter_layout: str | None = None) -> ir.Model:
    """Rewrite model in place according to plan and return it: its layers (merge_bits,
    weight_layout, adapter_layout: see plan_pipeline), then, when the plan has them, its integer
    activations (apply_activations). A saved plan applied to the same export rebuilds the file
    `quantize` wrote."""
    model = _run(plan_pipeline(plan, merge_bits, weight_layout, adapter_layout), model)
    if plan.activations is not None:
        apply_activations(model, plan.activations, plan.merge_bits if merge_bits is None else merge_bits)
    return model


def apply_activations(model: ir.Model, act: ActivationPlan, merged_bits: int | None = None) -> dict:
    """activation_pipeline(act, merged_bits) on model (in place); returns ActivationQDQPass's report."""
    pm = activation_pipeline(act, merged_bits)
    _run(pm, model)
    return pm.passes[1].report


def _run(pm: ir.passes.PassManager, model: ir.Model) -> ir.Model:
    try:
        with Progress("graph passes", quiet_end=True):
            return pm(model).model
    except _INFRA_ERRORS as exc:  # the pass infra wraps failures; surface the cause
        cause: BaseException = exc
        while isinstance(cause, _INFRA_ERRORS) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, _INFRA_ERRORS):
            raise OnnxModelError(f"graph rewrite failed: {cause}") from None
        raise cause from None
