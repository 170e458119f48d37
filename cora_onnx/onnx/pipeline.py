"""The one place where pass pipelines are declared."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from passes import (ActivationQDQPass, AdapterMergePass, BiasUpdatePass, CodebookDecodePass, LowRankBranchPass,
                    QuantScheme, StripExportMetadataPass, WeightNamesPass, WeightQDQPass)

from cora_onnx.core.errors import OnnxModelError
from cora_onnx.core.plan import ActivationPlan, Plan

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


def plan_pipeline(plan: Plan, merge_bits: int | None = None) -> ir.passes.PassManager:
    """Passes that apply a Plan's layers to the float ONNX graph exported from the BN-fused
    model. The planned weights first get their module names back (WeightNamesPass: a Linear
    exported as a MatMul holds its weight transposed under a generated name); the passes that find
    layers by their float weight name run before WeightQDQPass replaces it. The exporter's per-node
    debug metadata (stack traces, FX text) is dropped from the compressed file. merge_bits
    (default: the plan's): None exports CoRa adapters as branch convolutions; 7 or 8 merges them
    into their Conv's integer weight at load time (AdapterMergePass, for integer kernels)."""
    merge_bits = plan.merge_bits if merge_bits is None else merge_bits
    adapters = [LowRankBranchPass(plan), WeightQDQPass(plan)] if merge_bits is None else \
        [WeightQDQPass(plan), AdapterMergePass(plan, merge_bits)]
    return ir.passes.PassManager([WeightNamesPass(plan), BiasUpdatePass(plan), *adapters, CodebookDecodePass(plan), StripExportMetadataPass(),
                                  *cleanup_passes()])


def scheme_of(act: ActivationPlan) -> QuantScheme:
    return QuantScheme(act.act_dtype, act.weight_bits, act.reason)


def activation_pipeline(act: ActivationPlan) -> ir.passes.PassManager:
    """Static integer activations with the plan's calibrated ranges on a graph whose weights the
    plan pipeline already wrote, then cleanup. Its first pass (ActivationQDQPass) keeps a report."""
    return ir.passes.PassManager([ActivationQDQPass(act.ranges, scheme_of(act), weight_clip=act.weight_clip),
                                  *cleanup_passes()])


def apply_plan(model: ir.Model, plan: Plan, merge_bits: int | None = None) -> ir.Model:
    """Rewrite model in place according to plan and return it: its layers (merge_bits: see
    plan_pipeline), then, when the plan has them, its integer activations (apply_activations).
    A saved plan applied to the same export rebuilds the file `quantize` wrote."""
    model = _run(plan_pipeline(plan, merge_bits), model)
    if plan.activations is not None:
        apply_activations(model, plan.activations)
    return model


def apply_activations(model: ir.Model, act: ActivationPlan) -> dict:
    """activation_pipeline(act) on model (in place); returns ActivationQDQPass's report."""
    pm = activation_pipeline(act)
    _run(pm, model)
    return pm.passes[0].report


def _run(pm: ir.passes.PassManager, model: ir.Model) -> ir.Model:
    try:
        return pm(model).model
    except _INFRA_ERRORS as exc:  # the pass infra wraps failures; surface the cause
        cause: BaseException = exc
        while isinstance(cause, _INFRA_ERRORS) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, _INFRA_ERRORS):
            raise OnnxModelError(f"graph rewrite failed: {cause}") from None
        raise cause from None
