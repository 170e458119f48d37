"""One layer's weight on one encoding, fitted to a target weight under the metric of its inputs.

`fit_encoding` is used twice by the size-targeted search: on the float network's input statistics
for every encoding of the menu (their output errors rank the menu), and on the partially quantized
network's statistics for the encoding chosen (the weight that goes into the file). Uniform grids:
the range of each scale group with the least layer-output error, then GPTQ error feedback with
act-order (CoRa's grid; depthwise convs, one input metric per channel: the range per channel by
the same error, nearest rounding); 8 bits: the weight-error range and nearest rounding, as kept
layers get it. Codebooks: the Hessian-weighted EM and the sequential assignment of
cora_onnx.torch.search.pq. Adapters: the residual's top singular directions in the metric of the
inputs (`adapter_factors`), whose error for every rank is known from the singular values alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from cora_onnx.core.encoding import Encoding, row_width
from cora_onnx.torch.quantizers import (QuantSpec, QuantizedTensor, gptq_round, gptq_round_many, group_clips,
                                        input_weighted_clip, quantize_weight)
from cora_onnx.torch.search.pq.codebook import PqFit, assign_with_feedback, fit_codebook, inverse_cholesky

__all__ = ["Fit", "fit_encoding", "fit_menu", "relative_error", "weight_energy", "adapter_spectrum", "adapter_factors", "CLIP_RATIOS"]

CLIP_RATIOS = tuple(1.0 - 0.04 * i for i in range(13))  # as quantizers.input_weighted_clip


@dataclass(frozen=True, eq=False)
class Fit:
    """The fitted weight (C_out, ...) float32, its grid or codebook, and its relative output error
    sum_c (w - w^) H_c (w - w^)^T / sum_c w H_c w^T against the target under the fit's metric."""

    weight: torch.Tensor
    error: float
    grid: QuantizedTensor | None = None
    codebook: PqFit | None = None


def _energy(w2: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per output channel w H_g w^T, w2 (C, K), H (G, K, K) (channel c in group c // (C / G))."""
    G = H.shape[0]
    wg = w2.reshape(G, -1, w2.shape[1]).double()
    return torch.einsum("gok,gkl,gol->go", wg, H.double(), wg).reshape(-1)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, energy: float | None = None) -> float:
    """sum (w - w^) H (w - w^)^T / sum w H w^T, weights (C_out, ...), H (G, K, K); energy: the
    denominator when the caller has it (`weight_energy`). The numerator's product is float32 (a
    rounding error's energy, summed in float64), the denominator float64."""
    w2 = w.reshape(w.shape[0], -1)
    G = H.shape[0]
    eg = (w_hat.reshape(w2.shape).float() - w2.float()).reshape(G, -1, w2.shape[1])
    num = (torch.bmm(eg, H.float()).double() * eg.double()).sum()
    den = weight_energy(w, H) if energy is None else energy
    return float(num / max(den, 1e-30))


def weight_energy(w: torch.Tensor, H: torch.Tensor) -> float:
    """sum w H w^T (float64), the denominator of `relative_error`."""
    return float(_energy(w.reshape(w.shape[0], -1), H).sum())


def _grouped_grid(w: torch.Tensor, spec: QuantSpec, H: torch.Tensor) -> QuantizedTensor:
    """A grouped conv's per-channel grid (spec.group covers the row): each channel's range among
    CLIP_RATIOS of its max |w| by the layer-output error under its own group's metric, nearest rounding."""
    c = w.shape[0]
    w2 = w.detach().float().reshape(c, -1)
    amax = w2.abs().amax(1).clamp_min(1e-30)
    best = best_scale = best_q = None
    for r in CLIP_RATIOS:
        scale = (amax * r / spec.qmax).clamp(torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max)
        scale = scale.half().float()[:, None]
        q = (w2 / scale).round().clamp(spec.qmin, spec.qmax)
        err = _energy(q * scale - w2, H)
        if best is None:
            best, best_scale, best_q = err, scale, q
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better[:, None], scale, best_scale)
            best_q = torch.where(better[:, None], q, best_q)
    return QuantizedTensor(q=best_q.to(torch.int16).reshape(w.shape), scale=best_scale,
                           zero_point=torch.zeros(c, 1, dtype=torch.int16), spec=spec)


def fit_menu(w: torch.Tensor, encs: list[Encoding], H: torch.Tensor, *, damping: float = 0.01, em_iters: int = 20,
             generator: torch.Generator | None = None) -> dict[str, Fit]:
    """`fit_encoding` of every encoding in encs (adapters aside) to one weight, label -> Fit, sharing
    the work they have in common: the grids below 8 bits of an ungrouped layer take their ranges
    together (those of one group size at once, per channel being one group per row) and are rounded
    by one GPTQ pass (one inverse Hessian, their rows stacked); the codebooks' error feedback shares
    one inverse Cholesky factor. The same fits as one call per encoding, up to float summation order."""
    shape = tuple(w.shape)
    w = w.detach().float()
    energy = weight_energy(w, H)
    fits: dict[str, Fit] = {}
    grids = [e for e in encs if e.kind == "uniform" and e.bits < 8 and not e.rank] if H.shape[0] == 1 else []
    if grids:
        specs = {e.label: QuantSpec(bits=e.bits, group=e.scale_group(shape), clip="mse") for e in grids}
        clipped: dict[str, QuantizedTensor] = {}
        for g in sorted({sp.group for sp in specs.values()}):  # per channel is the group of a whole row
            same = [lab for lab, sp in specs.items() if sp.group == g]
            clipped.update(zip(same, group_clips(w, [specs[lab] for lab in same], H[0], CLIP_RATIOS)))
        labels = list(clipped)
        rounded = gptq_round_many(w, [clipped[lab] for lab in labels], H[0], damp=damping, act_order=True)
        for lab, qt in zip(labels, rounded):
            w_hat = qt.dequantize().float().reshape(shape)
            fits[lab] = Fit(w_hat, relative_error(w, w_hat, H, energy), grid=qt)
    factor = None
    for enc in encs:
        if enc.rank or enc.label in fits:
            continue
        if enc.kind == "pq" and factor is None and row_width(shape) // enc.block > 1:
            factor = inverse_cholesky(H)  # the damping assign_with_feedback uses by default
        fits[enc.label] = fit_encoding(w, enc, H, damping=damping, em_iters=em_iters, generator=generator,
                                       factor=factor, energy=energy)
    return fits


def fit_encoding(w: torch.Tensor, enc: Encoding, H: torch.Tensor, *, damping: float = 0.01, em_iters: int = 20,
                 generator: torch.Generator | None = None, factor: torch.Tensor | None = None,
                 energy: float | None = None) -> Fit:
    """Fit `enc` (its adapter aside) to the target weight w (C_out, ...) under H (G, K, K), the input
    covariance of each of the layer's G conv groups (see the module doc). factor: H's
    `inverse_cholesky` for a codebook's error feedback, energy: `weight_energy(w, H)`, when the
    caller has them."""
    shape = tuple(w.shape)
    c, k = shape[0], row_width(shape)
    G = H.shape[0]
    w = w.detach().float()
    if enc.kind == "uniform":
        spec = QuantSpec(bits=enc.bits, group=enc.scale_group(shape), clip="mse")
        if enc.bits >= 8:
            qt = quantize_weight(w, spec)
        elif G > 1:
            qt = _grouped_grid(w, spec, H)
        else:
            grid = input_weighted_clip(w, spec, H[0], ratios=CLIP_RATIOS)
            qt = gptq_round(w, grid, H[0], damp=damping, act_order=True)
        w_hat = qt.dequantize().float().reshape(shape)
        return Fit(w_hat, relative_error(w, w_hat, H, energy), grid=qt)
    d = enc.block
    m = k // d
    blocks = torch.diagonal(H.reshape(G, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
    wv = w.reshape(c, m, d)
    fit = fit_codebook(wv, blocks.float(), enc.codewords, em_iters, channel_scale=True, damping=damping,
                       generator=generator)
    if m > 1:
        fit = assign_with_feedback(wv, H.float(), fit, factor=factor, measure=False)
    w_hat = fit.weight().reshape(shape).float()
    err = relative_error(w, w_hat, H, energy)
    return Fit(w_hat, err, codebook=dataclasses.replace(fit, error=err))


def _metric_factor(H: torch.Tensor, damping: float) -> torch.Tensor:
    """L with L L^T = H + damping * mean diag(H) * I (one group)."""
    h = H.double()
    h = (h + h.T) / 2 + torch.eye(h.shape[0], dtype=h.dtype) * (damping * float(torch.diagonal(h).mean()) + 1e-12)
    return torch.linalg.cholesky(h)


def adapter_spectrum(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, damping: float = 0.01) -> np.ndarray:
    """Relative output error left by the best rank-r correction of the residual w - w^ in the
    metric H (1, K, K), for r = 0, 1, ..., full rank: the tail sums of the squared singular values
    of R L (L L^T = H), over sum w H w^T."""
    r = (w - w_hat).reshape(w.shape[0], -1).double()
    s = torch.linalg.svdvals(r @ _metric_factor(H[0], damping))
    tail = torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0])
    tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype)])
    return (tail / _energy(w.reshape(w.shape[0], -1), H).sum().clamp_min(1e-30)).numpy()


def adapter_factors(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, rank: int,
                    damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (C_out, rank), A (rank, K)) float32 with B A the best rank-`rank` correction of w - w^ in
    the metric H (1, K, K), the singular values split evenly between the factors."""
    r = (w - w_hat).reshape(w.shape[0], -1).double()
    L = _metric_factor(H[0], damping)
    u, s, vt = torch.linalg.svd(r @ L, full_matrices=False)
    v = torch.linalg.solve_triangular(L, vt[:rank], upper=False, left=False)  # V^T L^-1
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (v * root[:, None]).float()

