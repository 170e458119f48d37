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

__all__ = ["SecondMoment", "input_rows", "input_width", "input_second_moments"]


def input_width(mod: nn.Module) -> int:
    """K: the length of one input row of the layer (= weight.numel() / C_out)."""
    return mod.weight[0].numel()


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
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    n, k, positions = cols.shape
    if keep is not None and keep < positions:
        cols = cols[:, :, torch.randperm(positions, generator=gen)[:keep]]
    return cols.transpose(1, 2).reshape(-1, k)


class SecondMoment:
    """Running X^T X / rows over row blocks, accumulated in float64 (one K x K matrix)."""

    def __init__(self, k: int, chunk: int = 8192) -> None:
        self.sum = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0
        self.chunk = chunk

    def add(self, rows: torch.Tensor) -> None:
        """Fold a (n, K) block in; float32 products in chunks of rows, summed in float64."""
        rows = rows.detach().to(torch.float32)
        for i in range(0, rows.shape[0], self.chunk):
            r = rows[i:i + self.chunk]
            self.sum += (r.T @ r).double()
        self.rows += rows.shape[0]

    def value(self) -> torch.Tensor:
        """The second moment (float64); zeros before any row."""
        return self.sum / max(self.rows, 1)


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
            acc[name].add(input_rows(mod, inputs[0], keep, gen))
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
