"""Uniform weight quantizers (2-8 bits): per-tensor or per-output-channel, symmetric or
asymmetric, with min/max, k-standard-deviation (CoRa's choice) or per-channel MSE clipping.

Everything is vectorized over channels; the MSE search loops only over candidate clip ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SettingsError, check_bits

__all__ = ["quantizable_layers", "CLIP_METHODS", "QuantSpec", "QuantizedTensor", "quantize_weight", "fake_quantize",
           "output_error", "gptq_round", "input_weighted_clip"]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in definition order: the layers a search quantizes."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


CLIP_METHODS = ("minmax", "std", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight tensor.

    bits: 2-8. per_channel: one scale per output channel (axis 0). symmetric: signed grid with
    zero point 0, else unsigned grid with a zero point. clip: "minmax", "std" (mean +/- k*std,
    never wider than min/max) or "mse" (per-channel search of the range minimizing the squared
    weight error). k: the std multiplier. mse_grid: number of clip ratios tried by "mse".
    """

    bits: int = 4
    per_channel: bool = True
    symmetric: bool = True
    clip: str = "mse"
    k: float = 3.0
    mse_grid: int = 40

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.clip not in CLIP_METHODS:
            raise SettingsError(f"clip must be one of {', '.join(CLIP_METHODS)}, got {self.clip!r}")
        if not (self.k > 0):
            raise SettingsError(f"k (clipping std multiplier) must be > 0, got {self.k!r}")
        if not 2 <= int(self.mse_grid) <= 1000:
            raise SettingsError(f"mse_grid must be from 2 to 1000, got {self.mse_grid!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer values q (int16 tensor, shape of the weight) with scale and zero point of shape
    (C,) per channel or (1,) per tensor: w_hat = (q - zero_point) * scale along axis 0."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (self.q.dim() - 1))

    def dequantize(self) -> torch.Tensor:
        return (self.q.to(self.scale.dtype) - self._bcast(self.zero_point)) * self._bcast(self.scale)


def _ranges(w2: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = w2.amin(dim=1), w2.amax(dim=1)
    if spec.clip == "std":
        mean, std = w2.mean(dim=1), w2.std(dim=1, unbiased=False)
        lo = torch.maximum(lo, mean - spec.k * std)
        hi = torch.minimum(hi, mean + spec.k * std)
    return lo, hi


def _params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / spec.qmax).clamp_min(tiny)
        zp = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(tiny)
        zp = (spec.qmin - lo / scale).round().clamp(spec.qmin, spec.qmax)
    return scale, zp


def _fake(w2: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    q = (w2 / scale[:, None] + zp[:, None]).round().clamp(spec.qmin, spec.qmax)
    return (q - zp[:, None]) * scale[:, None]


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a weight (axis 0 = output channels) on the uniform grid described by spec."""
    if not torch.isfinite(w).all():
        raise SettingsError("weight has NaN or infinite values; cannot quantize")
    w32 = w.detach().to(torch.float32)
    w2 = w32.reshape(w32.shape[0], -1) if spec.per_channel else w32.reshape(1, -1)
    lo, hi = _ranges(w2, spec)
    if spec.clip == "mse":
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(1.0, 0.2, spec.mse_grid).tolist():
            clo, chi = lo * ratio, hi * ratio
            scale, zp = _params(clo, chi, spec)
            err = (_fake(w2, scale, zp, spec) - w2).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, clo, best_lo)
            best_hi = torch.where(better, chi, best_hi)
        lo, hi = best_lo, best_hi
    scale, zp = _params(lo, hi, spec)
    q = (w2 / scale[:, None] + zp[:, None]).round().clamp(spec.qmin, spec.qmax)
    return QuantizedTensor(q=q.to(torch.int16).reshape(w32.shape), scale=scale, zero_point=zp.to(torch.int16), spec=spec)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize in one step (same dtype and shape as w)."""
    return quantize_weight(w, spec).dequantize().to(w.dtype)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over output channels of (w - w_hat) H (w - w_hat)^T, weights flattened to (C_out, K): the
    layer's squared output error summed over the input rows whose second moment is H (K, K)."""
    e = w_hat.reshape(w.shape[0], -1).to(torch.float64) - w.reshape(w.shape[0], -1).to(torch.float64)
    return float(((e @ hessian.to(torch.float64)) * e).sum())


def input_weighted_clip(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor,
                        ratios: tuple[float, ...] = tuple(1.0 - 0.04 * i for i in range(13))) -> QuantizedTensor:
    """Per-channel grid whose range (min/max times one of `ratios`) minimizes the error on the layer
    *output* for nearest rounding: (w - w_hat) H (w - w_hat)^T per channel, with H the (K, K) second
    moment of the input rows (closed form per candidate). Needs spec.per_channel."""
    if not spec.per_channel:
        raise SettingsError("the input-weighted clip is per channel; spec.per_channel must be True")
    if not torch.isfinite(w).all():
        raise SettingsError("weight has NaN or infinite values; cannot quantize")
    w2 = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    h = hessian.to(torch.float32)
    lo0, hi0 = w2.amin(dim=1), w2.amax(dim=1)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for ratio in ratios:
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = _params(lo, hi, spec)
        e = _fake(w2, scale, zp, spec) - w2
        err = ((e @ h) * e).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    scale, zp = _params(best_lo, best_hi, spec)
    q = (w2 / scale[:, None] + zp[:, None]).round().clamp(spec.qmin, spec.qmax)
    return QuantizedTensor(q=q.to(torch.int16).reshape(w.shape), scale=scale, zero_point=zp.to(torch.int16), spec=spec)


def gptq_round(w: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor, damp: float = 0.01,
               block: int = 128, act_order: bool = False) -> QuantizedTensor:
    """Error-feedback rounding (GPTQ, Frantar et al. 2023) on the grid of `qt`.

    w: the weight (C_out, ...), flattened to (C_out, K) in the order of torch's unfold (channel,
    kernel row, kernel column); hessian: (K, K) second moment of the layer's input patches.
    Columns are rounded one at a time and the rounding error is pushed onto the columns not yet
    rounded, weighted by the inverse Hessian, so the layer *output* error shrinks. Same grid
    (scale, zero point) as qt: only the integer values change. damp: added to the diagonal, as a
    fraction of its mean; act_order: round the columns by descending Hessian diagonal (the inputs
    with the most energy first, while the most columns are left to absorb their error).
    """
    spec = qt.spec
    w2 = w.detach().to(torch.float32).reshape(w.shape[0], -1).clone()
    k = w2.shape[1]
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w2[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w2, h = w2[:, perm], h[perm][:, perm]
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    n = w2.shape[0]
    scale = qt.scale.reshape(-1, 1).expand(n, 1) if spec.per_channel else qt.scale.reshape(1, 1).expand(n, 1)
    zp = qt.zero_point.to(torch.float32).reshape(-1, 1).expand(n, 1) if spec.per_channel else \
        qt.zero_point.to(torch.float32).reshape(1, 1).expand(n, 1)
    q = torch.empty_like(w2)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb = w2[:, i0:i1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col = wb[:, j:j + 1]
            qc = (col / scale + zp).round().clamp(spec.qmin, spec.qmax)
            q[:, i0 + j:i0 + j + 1] = qc
            e = (col - (qc - zp) * scale) / hb[j, j]
            wb[:, j + 1:] -= e @ hb[j:j + 1, j + 1:]
            err[:, j:j + 1] = e
        w2[:, i1:] -= err @ hinv[i0:i1, i1:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return QuantizedTensor(q=q.to(torch.int16).reshape(w.shape), scale=qt.scale, zero_point=qt.zero_point, spec=spec)
