"""The harm of changing one layer: the network's mean KL(float || changed) on a few images when
only that layer's weight is replaced, for every layer and every candidate weight of it (CoRa's
per-layer widths; any per-layer choice of encoding under a budget can take the same table).

Measured, not estimated: each candidate's logits come from a forward pass, but only from the
stage (block) that holds the layer on. The float network's input to every stage is computed once
for the images and kept for the stage being measured (staged.model_stages: torchvision ResNets,
models whose forward starts with a Sequential, nn.Sequential, models with `cora_stages`); a layer
late in the network then costs the few blocks after it, not the whole network. Models without
known stages (or whose stages do not reproduce their forward) take a full forward pass per
candidate, as before.
"""

from __future__ import annotations

import logging
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.core.progress import Progress
from cora_onnx.torch.search.staged import checked_stages, stage_index

__all__ = ["layer_harm", "mean_kl"]

log = logging.getLogger(__name__)


def mean_kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of KL(p || q), p = exp(ref_logp) (float64 log-probabilities), q = softmax(logits)."""
    lq = F.log_softmax(logits.double(), dim=1)
    return float((ref_logp.exp() * (ref_logp - lq)).sum(1).mean())


def _swap(mod: nn.Module, w: torch.Tensor):
    keep = mod.weight.data
    mod.weight.data = w.to(keep.dtype).reshape(keep.shape)
    return keep


@torch.no_grad()
def layer_harm(model: nn.Module, layers: dict[str, nn.Module], candidates: dict[str, dict[Hashable, torch.Tensor]],
               images: torch.Tensor, batch: int = 32, progress: Progress | None = None,
               staged: bool = True) -> dict[str, dict[Hashable, float]]:
    """{layer: {key: mean KL(float || the model with only that layer's weight = candidates[layer][key])}}
    on the (normalized) images. staged False: a full forward pass per candidate (the reference the
    staged measurement is checked against). progress: advanced once per layer."""
    stages = checked_stages(model, images[:2]) if staged else None
    where = stage_index(stages, {n: layers[n] for n in candidates}) if stages is not None else {}
    if stages is not None and any(where[n] is None for n in candidates):
        log.info("harm: some layers are in no stage; full forward passes for those")

    def run(x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        parts = []
        for a in range(0, x.shape[0], batch):
            y = x[a:a + batch]
            for s in stages[start:stop]:
                y = s.run(y)
            parts.append(y)
        return torch.cat(parts)

    def full(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(x[a:a + batch]) for a in range(0, x.shape[0], batch)])

    ref = F.log_softmax((run(images, 0) if stages is not None else full(images)).double(), dim=1)
    out: dict[str, dict[Hashable, float]] = {}
    order = sorted(candidates, key=lambda n: (where.get(n) is None, where.get(n) or 0))
    cache, at = images, 0  # the float network's input to stage `at`
    for name in order:
        stage = where.get(name)
        if stage is not None and stage > at:
            cache, at = run(cache, at, stage), stage
        mod = layers[name]
        out[name] = {}
        for key, w in candidates[name].items():
            keep = _swap(mod, w)
            try:
                logits = run(cache, stage) if stage is not None else full(images)
            finally:
                mod.weight.data = keep
            out[name][key] = mean_kl(ref, logits)
        if progress is not None:
            progress.advance()
    return {n: out[n] for n in candidates}
