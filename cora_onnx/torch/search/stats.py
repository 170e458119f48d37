"""Streamed input statistics of Conv2d / Linear layers, shared by the searches.

A layer's output is its flattened weight (C_out, K) times its input rows: the unfolded patches of
a conv (K = C_in/groups * kh * kw, in torch's unfold order) or the input vectors of a Linear. Error
feedback rounding (GPTQ) and input-metric decompositions need the K x K second moment of those rows,
H = X^T X / rows. A layer whose K reaches thousands (ResNet-18's layer4: 4,608) needs several times
K rows for H to be full rank, which at 7 x 7 output positions means hundreds of images: the rows are
never stored, each batch's rows are summed into one float64 K x K accumulator per layer (float32
above quantizers.WIDE_K: 2.5 GB instead of 5 at VGG's K = 25,088), and the forward pass stops at
the deepest layer asked for.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.core.errors import ModelError
from cora_onnx.core.progress import Progress
from cora_onnx.torch.quantizers import WIDE_K

__all__ = ["SecondMoment", "channel_sums", "unfold", "patches_at", "output_positions", "input_rows", "input_width",
           "input_second_moments"]


def input_width(mod: nn.Module) -> int:
    """K: the length of one input row of the layer (= weight.numel() / C_out)."""
    return mod.weight[0].numel()


def _padding(mod: nn.Module) -> tuple[int, int]:
    """A conv's padding as numbers ("valid", or "same" with odd kernels, turned into them)."""
    pad = mod.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        if all(k % 2 for k in mod.kernel_size):
            return tuple(dl * (k - 1) // 2 for k, dl in zip(mod.kernel_size, mod.dilation))
        raise ModelError("padding='same' with an even kernel is not supported by the statistics pass")
    return tuple(pad)


def unfold(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> (N, C_in*kh*kw, L) patches (Linear: (N, C_in, 1)); string paddings
    ("valid", or "same" with odd kernels) are turned into their numbers."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    return F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=_padding(mod), stride=mod.stride)


def output_positions(mod: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """(H_out, W_out) of the conv on input x."""
    (ph, pw), (kh, kw), (dh, dw), (sh, sw) = _padding(mod), mod.kernel_size, mod.dilation, mod.stride
    return ((x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def patches_at(mod: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """unfold(mod, x)[:, :, positions] without unfolding the other positions: (N, C_in*kh*kw, len(positions))."""
    (ph, pw), (kh, kw), (dh, dw), (sh, sw) = _padding(mod), mod.kernel_size, mod.dilation, mod.stride
    _, wo = output_positions(mod, x)
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    rows = (positions // wo) * sh
    cols = (positions % wo) * sw
    ih = rows[None, None, :] + (torch.arange(kh) * dh)[:, None, None]  # (kh, 1, n)
    iw = cols[None, None, :] + (torch.arange(kw) * dw)[None, :, None]  # (1, kw, n)
    return xp[:, :, ih, iw].reshape(x.shape[0], -1, positions.shape[0])  # (N, C, kh, kw, n): unfold's order


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
    ho, wo = output_positions(mod, x)
    positions = ho * wo
    if keep is not None and keep < positions:
        cols = patches_at(mod, x, torch.randperm(positions, generator=gen)[:keep])
    else:
        cols = unfold(mod, x)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def channel_sums(out: torch.Tensor, mod: nn.Module) -> tuple[torch.Tensor, int]:
    """The output batch of layer `mod` -> per-channel sums (float64) and values per channel: a
    Conv2d's (N, C, H, W), a Linear's (..., C) (a 4-D one too: ConvNeXt's block Linears run on
    channels-last tensors)."""
    o = out.detach().float()
    o = o.transpose(0, 1).reshape(o.shape[1], -1) if not isinstance(mod, nn.Linear) else o.reshape(-1, o.shape[-1]).T
    return o.double().sum(1), o.shape[1]


PENDING_VALUES = 1 << 23  # rows held back by SecondMoment.add_rows before one product (32 MB of float32)


def _gram_into(acc: torch.Tensor, a: torch.Tensor) -> None:
    """acc (G, K, K) float64 (or float32) += a a^T for a (G, K, n) float32: for a wide K only the
    blocks on and above the diagonal are multiplied (the others are their transposes), 5/8 of the
    products at four blocks."""
    k = a.shape[1]
    parts = 1 if k < 1024 else 2 if k < 2048 else 4
    if parts == 1:
        acc.add_(torch.bmm(a, a.transpose(1, 2)).to(acc.dtype))
        return
    cuts = [(i * k // parts, (i + 1) * k // parts) for i in range(parts)]
    for i, (i0, i1) in enumerate(cuts):
        for j0, j1 in cuts[i:]:
            block = torch.bmm(a[:, i0:i1], a[:, j0:j1].transpose(1, 2)).to(acc.dtype)
            acc[:, i0:i1, j0:j1].add_(block)
            if j0 != i0:
                acc[:, j0:j1, i0:i1].add_(block.transpose(1, 2))


class SecondMoment:
    """Streamed (cross) second moment of layer inputs, per group, in float64: for column batches
    a, b of shape (G, K, n) (K values per row, n rows), accumulates sum a b^T (G, K, K), sum a and
    sum b (G, K) and n. Memory is O(G K^2) whatever the number of images. b defaults to a (the
    plain second moment). CoRa uses one group (`add_rows`, `take`), product quantization one per
    conv group and the cross moments between the float and the quantized network. dtype: of the
    K x K sum (float32 halves its memory: CoRa's layers wider than quantizers.WIDE_K)."""

    def __init__(self, size: int, groups: int = 1, chunk: int = 8192, dtype: torch.dtype = torch.float64) -> None:
        self.groups, self.size, self.chunk = groups, size, chunk
        self._count = 0
        self.ab = torch.zeros(groups, size, size, dtype=dtype)
        self.sum_a = torch.zeros(groups, size, dtype=torch.float64)
        self.sum_b = torch.zeros(groups, size, dtype=torch.float64)
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Fold (G, K, n) columns in (float32 products, float64 sums)."""
        G, K, n = a.shape
        if (G, K) != (self.groups, self.size) or (b is not None and b.shape != a.shape):
            raise ValueError(f"columns {tuple(a.shape)} do not fit a ({self.groups}, {self.size}, n) accumulator")
        if b is None:
            _gram_into(self.ab, a)
            s = a.sum(2).double()
            self.sum_a.add_(s)
            self.sum_b.add_(s)
        else:
            if self.ab.dtype == torch.float32:  # summed in place: no K x K product beside the sum
                self.ab.baddbmm_(a, b.transpose(1, 2))
            else:
                self.ab.add_(torch.bmm(a, b.transpose(1, 2)).to(self.ab.dtype))
            self.sum_a.add_(a.sum(2).double())
            self.sum_b.add_(b.sum(2).double())
        self._count += n

    def add_rows(self, rows: torch.Tensor) -> None:
        """Fold a (n, K) block of rows in (one group). Rows are held back until about
        PENDING_VALUES of them (at most `chunk` rows) are there, then multiplied in one product:
        fewer, larger products and float64 conversions of the K x K sum."""
        rows = rows.detach().to(torch.float32)
        self._pending.append(rows)
        self._pending_rows += rows.shape[0]
        if self._pending_rows >= max(1, min(self.chunk, PENDING_VALUES // max(self.size, 1))):
            self.flush()

    def flush(self) -> None:
        """Multiply in the rows add_rows holds back."""
        if not self._pending:
            return
        rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending, self._pending_rows = [], 0
        for i in range(0, rows.shape[0], self.chunk):
            self.add(rows[i:i + self.chunk].T[None])

    @property
    def count(self) -> int:
        """Rows folded in (those held back included)."""
        return self._count + self._pending_rows

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[a], E[b] (G, K) float64."""
        self.flush()
        n = float(max(self._count, 1))
        return self.sum_a / n, self.sum_b / n

    def moment(self, centered: bool = False, spend: bool = False) -> torch.Tensor:
        """E[a b^T] (G, K, K), in the sum's dtype, or the (cross-)covariance E[(a - E a)(b - E b)^T].
        spend: computed in the sum's own memory, without a second K x K (2.5 GB in float32 at
        K = 25,088); the accumulator is spent, as by take()."""
        self.flush()
        if self._count == 0:
            raise ModelError("no inputs were accumulated")
        if spend:
            out, self.ab = self.ab.div_(float(self._count)), None
            if centered:
                mu_a, mu_b = self.means()
                for g in range(self.groups):
                    out[g].addr_(mu_a[g].to(out.dtype), mu_b[g].to(out.dtype), alpha=-1)
            return out
        out = self.ab / float(self._count)
        if centered:
            mu_a, mu_b = self.means()
            out = out - mu_a[:, :, None] * mu_b[:, None, :]
        return out

    def value(self) -> torch.Tensor:
        """The (K, K) second moment of a one-group accumulator; zeros before any row."""
        self.flush()
        return self.ab[0] / max(self._count, 1)

    def take(self) -> torch.Tensor:
        """value(), divided in place: the sum's own memory becomes the result, without a second
        K x K (5 GB in float64 at K = 25,088); the accumulator is spent (its sum is gone)."""
        self.flush()
        out = self.ab[0].div_(max(self._count, 1))
        self.ab = None
        return out


class _Done(Exception):
    """Raised by a hook once every layer asked for has seen the batch: the rest of the forward is skipped."""


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                         rows: dict[str, int] | None = None, seed: int = 0,
                         progress: Progress | None = None, outputs: list | None = None) -> dict[str, SecondMoment]:
    """Run `model` on every batch and accumulate the input second moment of each module in `modules`
    (Conv2d with groups == 1, or Linear). rows: target rows per module over all the batches; a module
    with more positions than that keeps a random subset of output positions per image (never fewer
    than one); absent or None: every position of every image. Each batch's forward stops at the last
    of `modules` to run, unless `outputs` (a list) is given: the forward then runs to the end and
    the model's output of each batch is appended to it. The batches are consumed once (a list or a
    generator). progress: advanced once per batch."""
    batches = list(batches)
    images = sum(int(b.shape[0]) for b in batches)
    gen = torch.Generator().manual_seed(seed)
    acc = {n: SecondMoment(input_width(m), dtype=torch.float32 if input_width(m) > WIDE_K else torch.float64)
           for n, m in modules.items()}
    seen: set[str] = set()

    def hook(name: str):
        def fn(mod, inputs, out):
            target = None if rows is None else rows.get(name)
            keep = None if target is None else max(1, math.ceil(target / max(images, 1)))
            acc[name].add_rows(input_rows(mod, inputs[0], keep, gen))
            seen.add(name)
            if len(seen) == len(modules) and outputs is None:
                raise _Done
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for x in batches:
            seen.clear()
            try:
                out = model(x)
                if outputs is not None:
                    outputs.append(out.detach())
            except _Done:
                pass
            if progress is not None:
                progress.advance()
    finally:
        for h in handles:
            h.remove()
    for a in acc.values():
        a.flush()
    return acc
