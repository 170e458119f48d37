"""Input statistics of a layer on the (partially quantized) network: streamed over image batches,
memory bounded by the K x K accumulators, never by the number of images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...errors import ModelError
from ...progress import progress
from ..stats import SecondMoment, unfold
from .codebook import CHUNK

__all__ = ["Geom", "SecondMoment", "module_moment", "input_stats", "joint_stats", "layer_input",
           "output_means", "patches_per_image", "unfold"]


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class Geom:
    """A layer's PQ geometry: block kind, block size d, groups, m = sub-vectors per output channel."""

    name: str
    kind: str
    d: int
    groups: int
    m: int


def _columns(mod: nn.Module, x: torch.Tensor, groups: int):
    """`mod`'s input batch -> (G, K, n) patch columns, in chunks of at most CHUNK elements."""
    per_image = x[:1].numel() * (int(np.prod(mod.kernel_size)) if isinstance(mod, nn.Conv2d) else 1)
    step = max(1, CHUNK // max(per_image, 1))
    for a in range(0, x.shape[0], step):
        c = unfold(mod, x[a:a + step])
        N, FF, L = c.shape
        yield c.reshape(N, groups, FF // groups, L).permute(1, 2, 0, 3).reshape(groups, FF // groups, -1)


def module_moment(model: nn.Module, mod: nn.Module, groups: int, images, batch_size: int,
                  name: str = "a layer") -> SecondMoment:
    """The streamed second moment of `mod`'s unfolded inputs (K = C_in/groups * kh * kw) over
    the images, one batch at a time; each forward stops right after the layer's input is seen."""
    acc = None
    for x in images.batches(batch_size):
        xin = layer_input(model, mod, x, name)
        for cols in _columns(mod, xin, groups):
            if acc is None:
                acc = SecondMoment(cols.shape[1], groups)
            acc.add(cols)
    if acc is None:
        raise ModelError(f"{name}: no calibration images")
    return acc


def input_stats(model: nn.Module, mod: nn.Module, geom: Geom, images, batch_size: int, full: bool = False,
                centered: bool = False):
    """H (G, m, d, d) and mean patch (G, m*d) of `mod`'s input over the images (see
    `module_moment`). full: H is the whole (G, m*d, m*d) second moment per group instead of its
    diagonal blocks. centered: H is the covariance E[(x-mu)(x-mu)^T] instead of the second moment
    E[x x^T] (the error left once the bias absorbs the mean shift)."""
    G, m, d = geom.groups, geom.m, geom.d
    acc = module_moment(model, mod, G, images, batch_size, geom.name)
    H = acc.moment(centered).float()
    if full:
        H = H.reshape(G, 1, m * d, m * d)
    else:  # the diagonal d x d blocks
        H = torch.diagonal(H.reshape(G, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
    return H, acc.means()[0].float()


def layer_input(model: nn.Module, mod: nn.Module, x: torch.Tensor, name: str = "a layer") -> torch.Tensor:
    """`mod`'s input for the batch x; the forward stops right after the layer's input is seen."""
    seen = []

    def hook(_mod, inputs):
        seen.append(inputs[0].detach().float())
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ModelError(f"{name} was never called by the model's forward")
    return seen[0]


def joint_stats(teacher: nn.Module, tmod: nn.Module, student: nn.Module, smod: nn.Module, geom: Geom, images,
                batch_size: int, centered: bool = False) -> dict:
    """Full per-group statistics of the layer's input patches on the partially quantized network
    (x_q, `student`) and on the float network (x_f, `teacher`) for the same images, streamed one
    batch at a time: "qq" E[x_q x_q^T], "qf" E[x_q x_f^T], "ff" E[x_f x_f^T] (G, F, F), "mu_q" /
    "mu_f" (G, F); centered: covariances."""
    G, FF = geom.groups, geom.m * geom.d
    acc = {k: SecondMoment(FF, G) for k in ("qq", "qf", "ff")}
    for x in images.batches(batch_size):
        xq, xf = layer_input(student, smod, x, geom.name), layer_input(teacher, tmod, x, geom.name)
        for cq, cf in zip(_columns(smod, xq, G), _columns(smod, xf, G)):
            acc["qq"].add(cq)
            acc["qf"].add(cq, cf)
            acc["ff"].add(cf)
    if acc["qq"].count == 0:
        raise ModelError(f"{geom.name}: no calibration images")
    out = {k: v.moment(centered).float() for k, v in acc.items()}
    mu_q, mu_f = acc["qf"].means()
    out["mu_q"], out["mu_f"] = mu_q.float(), mu_f.float()
    return out


def patches_per_image(model: nn.Module, mods: dict[str, nn.Module], x: torch.Tensor) -> dict[str, int]:
    """Output positions per image of every layer (a Linear's: its rows per image), from one forward
    of the batch x."""
    seen: dict[str, int] = {}

    def make(name):
        def hook(_mod, _inp, out):
            seen[name] = int(out[0].numel() // out.shape[1]) if out.dim() == 4 else int(out.numel() // out.shape[-1]
                                                                                        // x.shape[0])
        return hook

    handles = [mod.register_forward_hook(make(n)) for n, mod in mods.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in mods if n not in seen]
    if missing:
        raise ModelError(f"layer {missing[0]} was never called by the model's forward")
    return seen


def output_means(model: nn.Module, mods: dict[str, nn.Module], images, batch_size: int) -> dict[str, torch.Tensor]:
    """Per-output-channel mean of every layer's output on the (float) model, one pass."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make(name):
        def hook(_mod, _inp, out):
            o = out.detach().float()
            o = o.transpose(0, 1).reshape(o.shape[1], -1) if o.dim() == 4 else o.reshape(-1, o.shape[-1]).T
            sums[name] = sums.get(name, 0) + o.double().sum(1)
            counts[name] = counts.get(name, 0) + o.shape[1]
        return hook

    handles = [mod.register_forward_hook(make(n)) for n, mod in mods.items()]
    try:
        with torch.no_grad():
            for x in progress(images.batches(batch_size), -(-len(images) // batch_size), "pq: float statistics", "batches"):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}
