"""The one place where pass pipelines are declared."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from passes import (AdapterMergePass, BiasUpdatePass, CodebookDecodePass, LowRankBranchPass, StripExportMetadataPass,
                    WeightNamesPass, WeightQDQPass)

from cora_onnx.core.errors import OnnxModelError
from cora_onnx.core.plan import Plan

__all__ = ["cleanup_passes", "plan_pipeline", "apply_plan"]


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
    """Passes that apply a Plan to the float ONNX graph exported from the BN-fused model. The
    planned weights first get their module names back (WeightNamesPass: a Linear exported as a
    MatMul holds its weight transposed under a generated name); the passes that find layers by
    their float weight name run before WeightQDQPass replaces it. The
    exporter's per-node debug metadata (stack traces, FX text) is dropped from the compressed file.
    merge_bits: None exports CoRa adapters as branch convolutions; 7 or 8 merges them into their
    Conv's integer weight at load time (AdapterMergePass, for integer kernels)."""
    adapters = [LowRankBranchPass(plan), WeightQDQPass(plan)] if merge_bits is None else \
        [WeightQDQPass(plan), AdapterMergePass(plan, merge_bits)]
    return ir.passes.PassManager([WeightNamesPass(plan), BiasUpdatePass(plan), *adapters, CodebookDecodePass(plan), StripExportMetadataPass(),
                                  *cleanup_passes()])


def apply_plan(model: ir.Model, plan: Plan, merge_bits: int | None = None) -> ir.Model:
    """Rewrite model in place according to plan and return it (merge_bits: see plan_pipeline)."""
    try:
        return plan_pipeline(plan, merge_bits)(model).model
    except _INFRA_ERRORS as exc:  # the pass infra wraps failures; surface the cause
        cause: BaseException = exc
        while isinstance(cause, _INFRA_ERRORS) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, _INFRA_ERRORS):
            raise OnnxModelError(f"graph rewrite failed: {cause}") from None
        raise cause from None
