"""What the choice is measured on: every layer's input covariance on the float network (one
streamed pass), and each layer's sensitivity (the network's KL when only that layer changes), run
from cached stage inputs so a late layer costs the end of the network, not all of it."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.onnx.data import permutation
from cora_onnx.torch.search.pq.statistics import _columns
from cora_onnx.torch.search.stats import SecondMoment
from cora_onnx.torch.search.staged import check_stages, model_stages

__all__ = ["float_covariances", "SensitivityProbe"]

log = logging.getLogger(__name__)


class _Done(Exception):
    pass


@torch.no_grad()
def float_covariances(model: nn.Module, layers: dict[str, nn.Module], images, sizes: dict[str, int],
                      batch_size: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (centered input covariance (G, K, K) float32, mean input (G, K)) of every layer on
    the float network, on images.subset(sizes[name], seed) (the first sizes[name] images of one
    permutation: one pass over max(sizes) images; a batch's forward stops after the last layer
    that still wants it)."""
    acc = {n: None for n in layers}
    order: list[str] = []
    handles = []
    state = {"start": 0, "left": set()}

    def hook(name: str):
        def fn(mod, inputs, out):
            if name not in order:
                order.append(name)
            if name not in state["left"]:
                return
            x = inputs[0].detach().float()
            take = sizes[name] - state["start"]
            x = x[:take]
            for cols in _columns(mod, x, int(getattr(mod, "groups", 1))):
                if acc[name] is None:
                    acc[name] = SecondMoment(cols.shape[1], cols.shape[0])
                acc[name].add(cols)
            state["left"].discard(name)
            if not state["left"]:
                raise _Done
        return fn

    for n, m in layers.items():
        handles.append(m.register_forward_hook(hook(n)))
    try:
        n_max = max(sizes.values())
        perm = permutation(len(images), seed)[:n_max]
        t0 = time.perf_counter()
        last = t0
        for a in range(0, n_max, batch_size):
            state["start"] = a
            state["left"] = {n for n in layers if sizes[n] > a}
            try:
                model(images.take(perm[a:a + batch_size]))
            except _Done:
                pass
            if time.perf_counter() - last > 20:
                last = time.perf_counter()
                log.info("auto: input statistics %d/%d images (%.0f s)", min(a + batch_size, n_max), n_max, last - t0)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, a in acc.items():
        out[n] = (a.moment(centered=True).float(), a.means()[0].float())
    return out


class SensitivityProbe:
    """The float network's logits on a few images and, when the model is a known chain of stages
    (cora_onnx.torch.search.staged), its input to every stage: `kl(name, weight)` runs only the
    stages from the layer's own on, with that layer's weight replaced."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> None:
        self.model, self.layers, self.x = model, layers, x
        self.stage_of: dict[str, int] = {}
        self.inputs: list[torch.Tensor] = []
        with torch.no_grad():
            self.ref = F.log_softmax(model(x).double(), 1)
        stages = model_stages(model)
        if stages is None or not check_stages(model, stages, x[:2]):
            log.info("auto: sensitivity by full forward passes (the model is not a known chain of stages)")
            return
        owner = {id(m): i for i, s in enumerate(stages) for top in s.modules for m in top.modules()}
        stage_of = {n: owner.get(id(m)) for n, m in layers.items()}
        if any(v is None for v in stage_of.values()):
            return
        self.stages, self.stage_of = stages, stage_of
        with torch.no_grad():
            h = x
            for s in stages:
                self.inputs.append(h)
                h = s.run(h)

    @torch.no_grad()
    def logits(self, name: str) -> torch.Tensor:
        if not self.stage_of:
            return self.model(self.x)
        i = self.stage_of[name]
        h = self.inputs[i]
        for s in self.stages[i:]:
            h = s.run(h)
        return h

    @torch.no_grad()
    def kl(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """Mean KL(float || the network with only `name`'s weight, and its bias when given, replaced)
        on the probe's images."""
        mod = self.layers[name]
        keep, keep_bias = mod.weight.data, mod.bias
        mod.weight.data = weight.to(keep.dtype).reshape(keep.shape)
        if bias is not None:
            mod.bias = nn.Parameter(bias.to(keep.dtype).reshape(-1), requires_grad=False)
        try:
            lq = F.log_softmax(self.logits(name).double(), 1)
        finally:
            mod.weight.data = keep
            mod.bias = keep_bias
        return float((self.ref.exp() * (self.ref - lq)).sum(1).mean())
