"""The Plan a CoRa search produces (grids, quantized adapters, biases, the search's figures) and
the report's `cora` section."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from cora_onnx.core.plan import Bias, LayerPlan, LowRankAdapter, Plan
from cora_onnx.torch.quantizers import QuantSpec, quantize_weight
from cora_onnx.torch.search.layers import layer_kind, uniform_from

if TYPE_CHECKING:
    from cora_onnx.torch.search.cora.search import _Search

log = logging.getLogger(__name__)


def _quantize_adapter(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric grid: (dequantized values, scales)."""
    qt = quantize_weight(t, QuantSpec(bits=bits, per_channel=True, symmetric=True, clip="minmax"))
    return qt.dequantize().to(torch.float32), qt.scale.to(torch.float32)


def _build_plan(st: _Search, grids: dict, live: list[str], seconds: float) -> Plan:
    """The Plan: each layer's grid (gains absorbed into the scales), adapter factors (quantized to
    adapter_bits) and bias when changed; the search's figures in meta["cora"]."""
    s = st.settings
    plans = []
    adapter_params = 0
    for name in st.bits:
        w = st.wrapped[name]
        qt = grids[name]
        gain = w.gain.detach()
        if not torch.allclose(gain, torch.ones_like(gain)):
            scale = (qt.scale.expand(gain.shape[0]) if not s.per_channel else qt.scale) * gain
            zp = qt.zero_point.expand(gain.shape[0]) if not s.per_channel else qt.zero_point
            qt = dataclasses.replace(qt, scale=scale.contiguous(), zero_point=zp.contiguous(),
                                     spec=dataclasses.replace(qt.spec, per_channel=True))
        adapter = None
        if w.mode == "hard":
            a = w.a.detach().reshape((w.a.shape[0],) + w.shape[1:])
            bmat = (w.b.detach() * gain[:, None]).reshape(w.shape[0], -1, 1, 1)
            a_scale = b_scale = None
            if s.adapter_bits:
                a, a_scale = _quantize_adapter(a, s.adapter_bits)
                bmat, b_scale = _quantize_adapter(bmat, s.adapter_bits)
            adapter = LowRankAdapter(rank=int(a.shape[0]), a=a.numpy().astype(np.float32),
                                     b=bmat.numpy().astype(np.float32), bits=s.adapter_bits or None,
                                     a_scale=None if a_scale is None else a_scale.numpy(),
                                     b_scale=None if b_scale is None else b_scale.numpy())
            adapter_params += adapter.params
        info = {"rank": st.ranks.get(name, 0), "full_rank": st.full.get(name, 0)}
        if name in st.c_final:
            info["cutoff"] = st.c_final[name]
        bias = w.bias.detach().numpy().astype(np.float32)
        orig_bias = st.layers[name].bias
        changed = orig_bias is None or not np.array_equal(bias, orig_bias.detach().numpy())
        plans.append(LayerPlan(name=name, kind=layer_kind(st.layers[name]), shape=tuple(w.shape),
                               uniform=uniform_from(qt), adapter=adapter, bias=Bias(bias) if changed else None,
                               info=info))
    meta = {"cora": {"iterations": len(st.history), "search_iterations": s.search_iters if st.adapted else 0,
                     "finetune_iterations": s.finetune_iters if live else 0,
                     "adapter_params": adapter_params, "weight_params": st.total_params,
                     "adapter_fraction": adapter_params / st.total_params, "budget": s.budget,
                     "ranks": {n: st.ranks[n] for n in st.adapted}, "search_seconds": seconds,
                     "loss_history": [round(h[0], 5) for h in st.history]}}
    if st.mixed is not None:
        meta["cora"]["mixed_bits"] = st.mixed
    meta["phases"] = st.phases.to_json()
    log.info("CoRa done in %.1f s: adapters %d parameters (%.2f%% of %d), %d steps", seconds, adapter_params,
             100 * adapter_params / st.total_params, st.total_params, len(st.history))
    return Plan(method="cora", settings={"method": "cora", **s.to_json()}, layers=tuple(plans), meta=meta)


def cora_report(plan: Plan) -> dict:
    """The report's `cora` section."""
    return {"cora": dict(plan.meta.get("cora", {}))}
