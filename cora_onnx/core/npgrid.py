"""Uniform weight grids in numpy (no torch): the same rule as cora_onnx.torch.quantizers for the
symmetric per-channel case, for code that works on ONNX files only (passes, `rewrite`).

quantize_symmetric(w, bits, clip) gives the integers and scales quantizers.quantize_weight
gives for QuantSpec(bits, per_channel=True, symmetric=True, clip) (tested for equality).
"""

from __future__ import annotations

import numpy as np

from cora_onnx.core.errors import SettingsError, check_bits
from cora_onnx.core.plan import LayerPlan

__all__ = ["quantize_symmetric", "default_clip", "adapter_factors", "merged_grid"]


def default_clip(bits: int) -> str:
    """The weight range search a uniform grid uses when none is asked for: "mse" below 7 bits, where
    rounding errors are large and clipping a few outliers pays; "minmax" at 7-8 bits, where the
    rounding error is small and random and the error of clipped large weights is systematic (the
    per-channel MSE search cost the W8A8 ResNet-18 0.8 points of agreement with float,
    docs/results/int8.md)."""
    return "minmax" if bits >= 7 else "mse"


def quantize_symmetric(w: np.ndarray, bits: int, clip: str | None = None, mse_grid: int = 40,
                       per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric grid along axis 0: returns (q int8 in w's shape, scale float32 (C,) or (1,)).

    clip: "minmax" (range = max |w|) or "mse" (per-channel search over mse_grid clip ratios
    from 1.0 to 0.2 of the min/max range, minimizing the squared weight error); None: default_clip(bits)."""
    bits = check_bits(bits)
    clip = default_clip(bits) if clip is None else clip
    if clip not in ("minmax", "mse"):
        raise SettingsError(f"clip must be minmax or mse for ONNX-side quantization, got {clip!r}")
    w = np.asarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise SettingsError("weight has NaN or infinite values; cannot quantize")
    w2 = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    tiny = np.finfo(np.float32).tiny
    lo, hi = w2.min(axis=1), w2.max(axis=1)

    def params(clo, chi):
        return np.maximum(np.maximum(np.abs(clo), np.abs(chi)) / np.float32(qmax), tiny).astype(np.float32)

    if clip == "mse":
        best_err = np.full(lo.shape, np.inf, dtype=np.float32)
        best_lo, best_hi = lo.copy(), hi.copy()
        for ratio in np.linspace(1.0, 0.2, mse_grid, dtype=np.float32):
            clo, chi = lo * ratio, hi * ratio
            s = params(clo, chi)[:, None]
            err = ((np.clip(np.round(w2 / s), qmin, qmax) * s - w2) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_lo, best_hi = np.where(better, clo, best_lo), np.where(better, chi, best_hi)
        lo, hi = best_lo, best_hi
    scale = params(lo, hi)
    q = np.clip(np.round(w2 / scale[:, None]), qmin, qmax).astype(np.int8).reshape(w.shape)
    return q, scale


def adapter_factors(layer: LayerPlan) -> tuple[np.ndarray, np.ndarray]:
    """The CoRa adapter of a plan layer as matrices (B: out x rank, A: rank x fan-in)."""
    ad = layer.adapter
    return ad.b.reshape(ad.b.shape[0], ad.rank), ad.a.reshape(ad.rank, -1)


def merged_grid(layer: LayerPlan, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(integer grid int8, per-output-channel scale float32) of W_q + B A (W_q alone for a layer
    without adapter, e.g. one with group-wise scales) on a symmetric `bits`-bit min/max grid: what
    ONNX Runtime computes at load from the graph passes.AdapterMergePass writes (and what
    export.apply_plan_torch's reference uses)."""
    w = layer.uniform.dequantize().astype(np.float32)
    if layer.adapter is not None:
        b, a = adapter_factors(layer)
        w = w + (b @ a).reshape(layer.shape)
    qmax = (1 << (bits - 1)) - 1
    peak = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -qmax, qmax).astype(np.int8)
    return q, scale
