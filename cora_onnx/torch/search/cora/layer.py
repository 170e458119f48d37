"""A planned layer during the search (`SearchLayer`: grid plus Butterworth-weighted residual) and the filter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


_TAIL = 1e6  # soft mode: ranks with T^2 < 1 / _TAIL are dropped from the product


def butterworth(c: torch.Tensor, full_rank: int, order: int) -> torch.Tensor:
    """T_i = 1 / sqrt(1 + ((i / R) / c)^(2n)) for i = 1..R: the normalized Butterworth low-pass."""
    i = torch.arange(1, full_rank + 1, dtype=torch.float32) / full_rank
    return torch.rsqrt(1 + (i / c).pow(2 * order))


class SearchLayer(nn.Module):
    """A planned layer during the search: conv/linear with weight gain * (W_q + B_T A_T) + bias."""

    def __init__(self, mod: nn.Module, wq: torch.Tensor, factors: tuple | None, order: int, init_c: float) -> None:
        super().__init__()
        self.is_conv = isinstance(mod, nn.Conv2d)
        self.conv_args = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups) \
            if self.is_conv else {}
        self.shape = tuple(mod.weight.shape)
        self.register_buffer("wq", wq.detach().reshape(self.shape[0], -1).clone())
        cout = self.shape[0]
        bias = mod.bias.detach().clone() if mod.bias is not None else torch.zeros(cout)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.register_buffer("gain", torch.ones(cout))
        self.order = order
        self.mode = "none"
        if factors is not None:
            u_s, v = factors  # (Cout, R) already scaled by S, and (R, K)
            self.register_buffer("us", u_s)
            self.register_buffer("v", v)
            self.full_rank = u_s.shape[1]
            self.c = nn.Parameter(torch.tensor(float(init_c)))
            self.mode = "soft"

    def delta(self) -> torch.Tensor | None:
        if self.mode == "soft":
            # ranks whose squared gain T^2 is below 1e-6 are left out: (i / (R c))^(2n) > 1e6, i.e.
            # i > R c 10^(6 / 2n) (5.6 R c at order 4): far below float32 rounding of the weight,
            # and the cutoffs sit low under a 5% budget, so most of the product is saved
            keep = min(self.full_rank, math.ceil(float(self.c.detach()) * self.full_rank * _TAIL ** (0.5 / self.order)))
            t2 = butterworth(self.c, self.full_rank, self.order)[:keep].pow(2)
            return (self.us[:, :keep] * t2) @ self.v[:keep]
        if self.mode == "hard":
            return self.b @ self.a
        return None

    def set_hard(self, rank: int) -> None:
        """Fix the rank: trainable factors B = U_r S_r^(1/2), A = S_r^(1/2) V_r (no more cutoff)."""
        s = self.us[:, :rank].norm(dim=0).clamp_min(1e-30)
        self.b = nn.Parameter((self.us[:, :rank] / s.sqrt()).clone())
        self.a = nn.Parameter((self.v[:rank] * s.sqrt()[:, None]).clone())
        self.mode = "hard"

    def weight(self) -> torch.Tensor:
        w = self.wq
        d = self.delta()
        if d is not None:
            w = w + d
        return (w * self.gain[:, None]).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, self.weight(), self.bias, **self.conv_args)
        return F.linear(x, self.weight(), self.bias)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
