"""The `pq` section of the quantize report."""

from __future__ import annotations

import numpy as np

from cora_onnx.core.plan import Plan

__all__ = ["pq_report"]


def pq_report(plan: Plan) -> dict:
    """The `pq` report section: block sizes, codewords, per-layer error, stored bytes by kind."""
    pq_layers = [lp for lp in plan.layers if lp.codebook is not None]
    codes = sum(lp.codebook.codes.nbytes for lp in pq_layers)
    books = sum(lp.codebook.codewords.nbytes for lp in pq_layers)
    scales = sum(lp.codebook.scale.nbytes for lp in pq_layers if lp.codebook.scale is not None)
    biases = sum(lp.codebook.bias.nbytes for lp in pq_layers if lp.codebook.bias is not None)
    uniform = sum((lp.uniform.stored_bits() + 7) // 8 for lp in plan.layers if lp.uniform is not None)
    sizes = sorted({(lp.info.get("block_kind"), lp.codebook.block_size) for lp in pq_layers})
    return {"pq": {
        "blocks": plan.settings.get("blocks"),
        "block_sizes": {k: d for k, d in sizes},
        "codewords": plan.settings.get("codewords"),
        "layers_pq": len(pq_layers),
        "layers_uniform": sum(lp.uniform is not None for lp in plan.layers),
        "stored_bytes": {"codes": codes, "codewords": books, "channel_scales": scales, "pq_biases": biases,
                         "uniform_layers": uniform},
        "finetune": dict(plan.meta.get("pq_finetune", {})),
        "layers": [{"name": lp.name, "block_kind": lp.info.get("block_kind"), "block_size": lp.codebook.block_size,
                    "codewords": int(lp.codebook.codewords.shape[0]),
                    "activation_weighted_error": lp.info.get("activation_weighted_error"),
                    "relative_weight_mse": lp.info.get("relative_weight_mse"),
                    "bits_per_weight": lp.codebook.stored_bits() / float(np.prod(lp.shape))} for lp in pq_layers],
    }}
