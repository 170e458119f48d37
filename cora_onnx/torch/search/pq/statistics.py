"""Input statistics of a layer on the (partially quantized) network: streamed over image batches,
memory bounded by the K x K accumulators, never by the number of images. Above quantizers.WIDE_K
(VGG's classifier, K = 25,088) the sums are float32 and each moment is made in its sum's own
memory: one 2.5 GB K x K per moment instead of a float64 sum (5 GB) and its copies; the product
quantization of such a layer needs no K x K at all (`span_stats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from cora_onnx.core.errors import ModelError
from cora_onnx.core.progress import progress
from cora_onnx.torch.quantizers import WIDE_K
from cora_onnx.torch.search.stats import SecondMoment, _gram_into, channel_sums, unfold
from cora_onnx.torch.search.staged import layer_input as staged_layer_input
from cora_onnx.torch.search.pq.codebook import CHUNK, Spans

__all__ = ["Geom", "SecondMoment", "sum_dtype", "moment_of", "module_moment", "layer_inputs", "input_stats", "joint_stats",
           "span_stats", "layer_input", "output_means", "patches_per_image", "unfold"]


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


def sum_dtype(width: int) -> torch.dtype:
    """The dtype of a K x K sum of inputs of that width: float64, float32 above WIDE_K."""
    return torch.float32 if width > WIDE_K else torch.float64


def moment_of(inputs: Iterable[torch.Tensor], mod: nn.Module, groups: int, name: str = "a layer") -> SecondMoment:
    """The streamed second moment of `mod`'s unfolded inputs (K = C_in/groups * kh * kw) over
    batches of its input."""
    acc = None
    for xin in inputs:
        for cols in _columns(mod, xin, groups):
            if acc is None:
                acc = SecondMoment(cols.shape[1], groups, dtype=sum_dtype(cols.shape[1]))
            acc.add(cols)
    if acc is None:
        raise ModelError(f"{name}: no calibration images")
    return acc


def layer_inputs(model: nn.Module, mod: nn.Module, images, batch_size: int,
                 name: str = "a layer") -> Iterator[torch.Tensor]:
    """`mod`'s input for each batch of the images, by a forward that stops right there."""
    for x in images.batches(batch_size):
        yield layer_input(model, mod, x, name)


def module_moment(model: nn.Module, mod: nn.Module, groups: int, images, batch_size: int,
                  name: str = "a layer") -> SecondMoment:
    """`moment_of` the layer's inputs over the images, one forward per batch."""
    return moment_of(layer_inputs(model, mod, images, batch_size, name), mod, groups, name)


def input_stats(model: nn.Module, mod: nn.Module, geom: Geom, images, batch_size: int, full: bool = False,
                centered: bool = False, inputs: Iterable[torch.Tensor] | None = None):
    """H (G, m, d, d) and mean patch (G, m*d) of `mod`'s input over the images (see
    `module_moment`; inputs: the layer's input batches instead, e.g. from a staged.LayerFeed).
    full: H is the whole (G, m*d, m*d) second moment per group instead of its diagonal blocks.
    centered: H is the covariance E[(x-mu)(x-mu)^T] instead of the second moment E[x x^T] (the
    error left once the bias absorbs the mean shift)."""
    G, m, d = geom.groups, geom.m, geom.d
    if inputs is None:
        inputs = layer_inputs(model, mod, images, batch_size, geom.name)
    acc = moment_of(inputs, mod, G, geom.name)
    H = acc.moment(centered, spend=m * d > WIDE_K).float()
    if full:
        H = H.reshape(G, 1, m * d, m * d)
    else:  # the diagonal d x d blocks
        H = torch.diagonal(H.reshape(G, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
    return H, acc.means()[0].float()


def layer_input(model: nn.Module, mod: nn.Module, x: torch.Tensor, name: str = "a layer") -> torch.Tensor:
    """`mod`'s input for the batch x; the forward stops right after the layer's input is seen."""
    out = staged_layer_input(model, mod, x)
    if out is None:
        raise ModelError(f"{name} was never called by the model's forward")
    return out


def joint_stats(teacher: nn.Module, tmod: nn.Module, student: nn.Module, smod: nn.Module, geom: Geom, images,
                batch_size: int, centered: bool = False,
                pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                moments: tuple[str, ...] = ("qq", "qf", "ff")) -> dict:
    """Full per-group statistics of the layer's input patches on the partially quantized network
    (x_q, `student`) and on the float network (x_f, `teacher`) for the same images, streamed one
    batch at a time (pairs: the (x_q, x_f) input batches instead, e.g. from a staged.LayerFeed):
    "qq" E[x_q x_q^T], "qf" E[x_q x_f^T], "ff" E[x_f x_f^T] (G, F, F), "mu_q" / "mu_f" (G, F);
    centered: covariances. moments: which of qq, qf, ff to accumulate (qf always: the means come
    from it); each is a product over every patch, the cost of this pass, and a K x K."""
    G, FF = geom.groups, geom.m * geom.d
    acc = {k: SecondMoment(FF, G, dtype=sum_dtype(FF)) for k in ("qq", "qf", "ff") if k in moments or k == "qf"}
    if pairs is None:
        pairs = ((layer_input(student, smod, x, geom.name), layer_input(teacher, tmod, x, geom.name))
                 for x in images.batches(batch_size))
    for xq, xf in pairs:
        for cq, cf in zip(_columns(smod, xq, G), _columns(smod, xf, G)):
            acc["qf"].add(cq, cf)
            if "qq" in acc:
                acc["qq"].add(cq)
            if "ff" in acc:
                acc["ff"].add(cf)
    if acc["qf"].count == 0:
        raise ModelError(f"{geom.name}: no calibration images")
    out = {k: v.moment(centered, spend=FF > WIDE_K).float() for k, v in acc.items()}
    mu_q, mu_f = acc["qf"].means()
    out["mu_q"], out["mu_f"] = mu_q.float(), mu_f.float()
    return out


def span_stats(mod: nn.Module, geom: Geom, span: int, batches: Iterable, w: torch.Tensor | None = None,
               centered: bool = False) -> dict:
    """What the product quantization of a layer wider than WIDE_K uses of its input statistics,
    without a K x K: "qq", the diagonal blocks over spans of `span` inputs of the student's
    E[x_q x_q^T] (codebook.Spans, float32 sums: K x span values), "mu_q" (G, K). batches: the
    student layer's input batches (staged.LayerFeed.student_inputs); with w, the layer's float
    weight (C_out, K): (x_q, x_f) pairs (LayerFeed.pairs) and also "residual", the float target's
    correction (H_qf - H_qq) W^T per group (G, K, C_out/G; codebook.float_target_spans), summed as
    E[x_q ((x_f - x_q)^T W^T)] (no difference of two large moments, no K x K), and "mu_f".
    centered: covariances, as in `joint_stats`."""
    G, FF = geom.groups, geom.m * geom.d
    cuts = [(a, min(a + span, FF)) for a in range(0, FF, span)]
    blocks = [torch.zeros(G, b - a, b - a) for a, b in cuts]
    sums = {"q": torch.zeros(G, FF, dtype=torch.float64)}
    residual = Wg = None
    if w is not None:
        Wg = w.reshape(G, -1, FF).float()
        residual = torch.zeros(G, FF, Wg.shape[1])
        sums["f"] = torch.zeros(G, FF, dtype=torch.float64)
    count = 0
    for batch in batches:
        xq, xf = batch if w is not None else (batch, None)
        floats = _columns(mod, xf, G) if xf is not None else None
        for cq in _columns(mod, xq, G):
            for (a, b), block in zip(cuts, blocks):
                _gram_into(block, cq[:, a:b])
            sums["q"] += cq.sum(2).double()
            count += cq.shape[2]
            if floats is not None:
                cf = next(floats)
                sums["f"] += cf.sum(2).double()
                residual.baddbmm_(cq, torch.bmm(Wg, cf - cq).transpose(1, 2))
    if count == 0:
        raise ModelError(f"{geom.name}: no calibration images")
    mu = {k: v / count for k, v in sums.items()}
    for (a, b), block in zip(cuts, blocks):
        block /= count
        if centered:
            for g in range(G):
                block[g].addr_(mu["q"][g, a:b].float(), mu["q"][g, a:b].float(), alpha=-1)
    out = {"qq": Spans(tuple(blocks), span), "mu_q": mu["q"].float()}
    if residual is not None:
        residual /= count
        if centered:  # Cov_qf - Cov_qq = E[x_q (x_f - x_q)^T] - mu_q (mu_f - mu_q)^T
            for g in range(G):
                residual[g].addr_(mu["q"][g].float(), Wg[g] @ (mu["f"][g] - mu["q"][g]).float(), alpha=-1)
        out["residual"], out["mu_f"] = residual, mu["f"].float()
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
        def hook(mod, _inp, out):
            total, n = channel_sums(out, mod)
            sums[name] = sums.get(name, 0) + total
            counts[name] = counts.get(name, 0) + n
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
