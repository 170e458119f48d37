"""Streamed input statistics of Conv2d / Linear layers, shared by the searches.

A layer's output is its flattened weight (C_out, K) times its input rows: the unfolded patches of
a conv (K = C_in/groups * kh * kw, in torch's unfold order) or the input vectors of a Linear. Error
feedback rounding (GPTQ) and input-metric decompositions need the K x K second moment of those rows,
H = X^T X / rows. A layer whose K reaches thousands (ResNet-18's layer4: 4,608) needs several times
K rows for H to be full rank, which at 7 x 7 output positions means hundreds of images: the rows are
never stored, each batch's rows are summed into one float64 K x K accumulator per layer, and the
forward pass stops at the deepest layer asked for.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.core.errors import ModelError

__all__ = ["SecondMoment", "channel_sums", "unfold", "input_rows", "input_width", "input_second_moments"]


def input_width(mod: nn.Module) -> int:
    """K: the length of one input row of the layer (= weight.numel() / C_out)."""
    return mod.weight[0].numel()


def unfold(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> (N, C_in*kh*kw, L) patches (Linear: (N, C_in, 1)); string paddings
    ("valid", or "same" with odd kernels) are turned into their numbers."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    pad = mod.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        elif all(k % 2 for k in mod.kernel_size):
            pad = tuple(dl * (k - 1) // 2 for k, dl in zip(mod.kernel_size, mod.dilation))
        else:
            raise ModelError("padding='same' with an even kernel is not supported by the statistics pass")
    return F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)


def input_rows(mod: nn.Module, x: torch.Tensor, keep: int | None = None,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """(rows, K) input rows of `mod` for its input x. keep: per image, at most this many output
    positions, drawn at random (the same positions for every image of the batch); None: all."""
    if isinstance(mod, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        if keep is not None and keep < rows.shape[0]:
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[:keep]]
        return rows
    if mod.groups != 1:
        raise ValueError("input rows of a grouped conv are per group; not supported")
    cols = unfold(mod, x)
    n, k, positions = cols.shape
    if keep is not None and keep < positions:
        cols = cols[:, :, torch.randperm(positions, generator=gen)[:keep]]
    return cols.transpose(1, 2).reshape(-1, k)


def channel_sums(out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A layer's output batch (N, C, H, W) or (..., C) -> per-channel sums (float64) and values per channel."""
    o = out.detach().float()
    o = o.transpose(0, 1).reshape(o.shape[1], -1) if o.dim() == 4 else o.reshape(-1, o.shape[-1]).T
    return o.double().sum(1), o.shape[1]


class SecondMoment:
    """Streamed (cross) second moment of layer inputs, per group, in float64: for column batches
    a, b of shape (G, K, n) (K values per row, n rows), accumulates sum a b^T (G, K, K), sum a and
    sum b (G, K) and n. Memory is O(G K^2) whatever the number of images. b defaults to a (the
    plain second moment). CoRa uses one group (`add_rows`, `value`), product quantization one per
    conv group and the cross moments between the float and the quantized network."""

    def __init__(self, size: int, groups: int = 1, chunk: int = 8192) -> None:
        self.groups, self.size, self.count, self.chunk = groups, size, 0, chunk
        self.ab = torch.zeros(groups, size, size, dtype=torch.float64)
        self.sum_a = torch.zeros(groups, size, dtype=torch.float64)
        self.sum_b = torch.zeros(groups, size, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Fold (G, K, n) columns in (float32 products, float64 sums)."""
        G, K, n = a.shape
        if (G, K) != (self.groups, self.size) or (b is not None and b.shape != a.shape):
            raise ValueError(f"columns {tuple(a.shape)} do not fit a ({self.groups}, {self.size}, n) accumulator")
        bb = a if b is None else b
        self.ab.add_(torch.bmm(a, bb.transpose(1, 2)).double())
        self.sum_a.add_(a.sum(2).double())
        self.sum_b.add_(bb.sum(2).double())
        self.count += n

    def add_rows(self, rows: torch.Tensor) -> None:
        """Fold a (n, K) block of rows in (one group), `chunk` rows at a time."""
        rows = rows.detach().to(torch.float32)
        for i in range(0, rows.shape[0], self.chunk):
            self.add(rows[i:i + self.chunk].T[None])

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[a], E[b] (G, K) float64."""
        n = float(max(self.count, 1))
        return self.sum_a / n, self.sum_b / n

    def moment(self, centered: bool = False) -> torch.Tensor:
        """E[a b^T] (G, K, K) float64, or the (cross-)covariance E[(a - E a)(b - E b)^T]."""
        if self.count == 0:
            raise ModelError("no inputs were accumulated")
        out = self.ab / float(self.count)
        if centered:
            mu_a, mu_b = self.means()
            out = out - mu_a[:, :, None] * mu_b[:, None, :]
        return out

    def value(self) -> torch.Tensor:
        """The (K, K) second moment of a one-group accumulator; zeros before any row."""
        return self.ab[0] / max(self.count, 1)


class _Done(Exception):
    """Raised by a hook once every layer asked for has seen the batch: the rest of the forward is skipped."""


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                         rows: dict[str, int] | None = None, seed: int = 0) -> dict[str, SecondMoment]:
    """Run `model` on every batch and accumulate the input second moment of each module in `modules`
    (Conv2d with groups == 1, or Linear). rows: target rows per module over all the batches; a module
    with more positions than that keeps a random subset of output positions per image (never fewer
    than one); absent or None: every position of every image. Each batch's forward stops at the last
    of `modules` to run. The batches are consumed once (a list or a generator)."""
    batches = list(batches)
    images = sum(int(b.shape[0]) for b in batches)
    gen = torch.Generator().manual_seed(seed)
    acc = {n: SecondMoment(input_width(m)) for n, m in modules.items()}
    seen: set[str] = set()

    def hook(name: str):
        def fn(mod, inputs, out):
            target = None if rows is None else rows.get(name)
            keep = None if target is None else max(1, math.ceil(target / max(images, 1)))
            acc[name].add_rows(input_rows(mod, inputs[0], keep, gen))
            seen.add(name)
            if len(seen) == len(modules):
                raise _Done
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for x in batches:
            seen.clear()
            try:
                model(x)
            except _Done:
                pass
    finally:
        for h in handles:
            h.remove()
    return acc
