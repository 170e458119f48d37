"""Uniform weight quantizers (2-8 bits): per-tensor or per-output-channel, symmetric or
asymmetric, with min/max, k-standard-deviation (CoRa's choice) or per-channel MSE clipping.

Everything is vectorized over channels; the MSE search loops only over candidate clip ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from cora_onnx.core.errors import SettingsError, check_bits

__all__ = ["quantizable_layers", "CLIP_METHODS", "QuantSpec", "QuantizedTensor", "quantize_weight", "fake_quantize",
           "output_error", "gptq_round", "gptq_round_many", "input_weighted_clip", "group_clips", "check_group", "group_count", "group_columns",
           "WIDE_K"]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in definition order: the layers a search quantizes."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


CLIP_METHODS = ("minmax", "std", "mse")

WIDE_K = 8192
"""Input width K above which the output-error clip and GPTQ stop working on the whole K x K input
second moment H: their cost grows as rows x K^2 (and K^3 for GPTQ's factorization), with several
K x K copies, which a classifier's Linear 25088 -> 4096 (VGG) takes hours and over 15 GB for. Above
it the clip weighs each weight's error by H's diagonal alone (each group's or channel's error is
then its own: O(rows x K) per candidate range), GPTQ works on spans of WIDE_K columns each alone
(`gptq_round_many`), output_error multiplies by column blocks of H, and the statistics pass sums H
in float32 (cora_onnx.torch.search.stats.input_second_moments). Layers up to this width get exactly
what they got before it existed."""


def check_group(group) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or not (group == 0 or 2 <= group <= 65536):
        raise SettingsError(f"group size must be 0 (per channel) or an integer from 2 to 65536, got {group!r}")


def group_count(k: int, group: int) -> int:
    """Groups of `group` weights in a row of k (the last one may be shorter); 1 when group is 0."""
    return -(-k // group) if group else 1


def group_columns(scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """(C, ceil(k / group)) group values -> (C, k), one per weight column."""
    return scale.repeat_interleave(group, dim=1)[:, :k]


def _half(scale: torch.Tensor) -> torch.Tensor:
    """Scales as stored for groups: float16, at least its smallest normal value."""
    return scale.clamp(torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max).half().float()


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight tensor.

    bits: 2-8. per_channel: one scale per output channel (axis 0). symmetric: signed grid with
    zero point 0, else unsigned grid with a zero point. clip: "minmax", "std" (mean +/- k*std,
    never wider than min/max) or "mse" (per-channel search of the range minimizing the squared
    weight error). k: the std multiplier. mse_grid: number of clip ratios tried by "mse".
    group: 0, or one scale per group of `group` consecutive weights of an output channel (the
    weight flattened to (C_out, K) in torch's order; the last group of a channel is shorter when
    `group` does not divide K), stored as float16 (the scales are rounded to it); needs
    per_channel and symmetric.
    """

    bits: int = 4
    per_channel: bool = True
    symmetric: bool = True
    clip: str = "mse"
    k: float = 3.0
    mse_grid: int = 40
    group: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.clip not in CLIP_METHODS:
            raise SettingsError(f"clip must be one of {', '.join(CLIP_METHODS)}, got {self.clip!r}")
        if not (self.k > 0):
            raise SettingsError(f"k (clipping std multiplier) must be > 0, got {self.k!r}")
        if not 2 <= int(self.mse_grid) <= 1000:
            raise SettingsError(f"mse_grid must be from 2 to 1000, got {self.mse_grid!r}")
        check_group(self.group)
        if self.group and not (self.per_channel and self.symmetric):
            raise SettingsError("group-wise scales need a per-channel symmetric grid")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer values q (int16 tensor, shape of the weight) with scale and zero point of shape
    (C,) per channel or (1,) per tensor: w_hat = (q - zero_point) * scale along axis 0; with
    spec.group, shape (C, groups) and w_hat = q * scale of the weight's group (zero points 0)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (self.q.dim() - 1))

    def columns(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per weight of the (C, K) flattened weight; idx: of those columns only
        (C, len(idx)), without the (C, K) expansion of group scales."""
        c = self.q.shape[0]
        k = self.q[0].numel()
        if idx is not None:
            if self.spec.group:
                at = idx // self.spec.group
                return self.scale[:, at], self.zero_point[:, at].to(torch.float32)
            return (self.scale.reshape(-1, 1).expand(c, len(idx)),
                    self.zero_point.to(torch.float32).reshape(-1, 1).expand(c, len(idx)))
        if self.spec.group:
            return (group_columns(self.scale, k, self.spec.group),
                    group_columns(self.zero_point, k, self.spec.group).to(torch.float32))
        return (self.scale.reshape(-1, 1).expand(c, k),
                self.zero_point.to(torch.float32).reshape(-1, 1).expand(c, k))

    def dequantize(self) -> torch.Tensor:
        if self.spec.group:
            s, _ = self.columns()
            return (self.q.reshape(self.q.shape[0], -1).to(s.dtype) * s).reshape(self.q.shape)
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
    if spec.group:
        return _grouped(w32, spec)
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


def _grouped(w32: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """A group-wise grid from the per-channel quantizer applied to the groups as rows: the weight
    (C, K) cut into C * groups rows of `group` values (the last group padded with zeros, which
    change neither its range nor its error), each row's scale from quantize_weight, rounded to
    float16, then every weight rounded to its group's scale."""
    c = w32.shape[0]
    w2 = w32.reshape(c, -1)
    k, g = w2.shape[1], spec.group
    ng = group_count(k, g)
    rows = torch.nn.functional.pad(w2, (0, ng * g - k)).reshape(c * ng, g)
    scale = _half(quantize_weight(rows, replace(spec, group=0)).scale.reshape(c, ng))
    cols = group_columns(scale, k, g)
    q = (w2 / cols).round().clamp(spec.qmin, spec.qmax)
    return QuantizedTensor(q=q.to(torch.int16).reshape(w32.shape), scale=scale,
                           zero_point=torch.zeros(c, ng, dtype=torch.int16), spec=spec)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize in one step (same dtype and shape as w)."""
    return quantize_weight(w, spec).dequantize().to(w.dtype)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over output channels of (w - w_hat) H (w - w_hat)^T, weights flattened to (C_out, K): the
    layer's squared output error summed over the input rows whose second moment is H (K, K). In
    float64; above WIDE_K by blocks of 2048 columns of H (no float64 copy of a float32 H)."""
    e = w_hat.reshape(w.shape[0], -1).to(torch.float64, copy=True)
    e -= w.reshape(w.shape[0], -1)  # in place: one (C_out, K) float64 array, not three
    k = e.shape[1]
    if k <= WIDE_K:
        return float(((e @ hessian.to(torch.float64)) * e).sum())
    return float(sum(((e @ hessian[:, j:j + 2048].to(torch.float64)) * e[:, j:j + 2048]).sum()
                     for j in range(0, k, 2048)))


def input_weighted_clip(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor,
                        ratios: tuple[float, ...] = tuple(1.0 - 0.04 * i for i in range(13))) -> QuantizedTensor:
    """Per-channel grid whose range (min/max times one of `ratios`) minimizes the error on the layer
    *output* for nearest rounding: (w - w_hat) H (w - w_hat)^T per channel, with H the (K, K) second
    moment of the input rows (closed form per candidate); above WIDE_K with H's diagonal alone.
    Needs spec.per_channel."""
    if not spec.per_channel:
        raise SettingsError("the input-weighted clip is per channel; spec.per_channel must be True")
    if not torch.isfinite(w).all():
        raise SettingsError("weight has NaN or infinite values; cannot quantize")
    if spec.group:
        return _input_weighted_group_clip(w, spec, hessian, ratios)
    w2 = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    wide = w2.shape[1] > WIDE_K
    h = torch.diagonal(hessian).to(torch.float32) if wide else hessian.to(torch.float32)
    lo0, hi0 = w2.amin(dim=1), w2.amax(dim=1)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for ratio in ratios:
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = _params(lo, hi, spec)
        e = _fake(w2, scale, zp, spec) - w2
        err = (e * e * h).sum(dim=1) if wide else ((e @ h) * e).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    scale, zp = _params(best_lo, best_hi, spec)
    q = (w2 / scale[:, None] + zp[:, None]).round().clamp(spec.qmin, spec.qmax)
    return QuantizedTensor(q=q.to(torch.int16).reshape(w.shape), scale=scale, zero_point=zp.to(torch.int16), spec=spec)


def _input_weighted_group_clip(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor, ratios: tuple[float, ...],
                               sweeps: int = 2, half: bool = True) -> QuantizedTensor:
    """input_weighted_clip for group-wise scales: each group's range is max|w| of the group times one
    of `ratios`, chosen by the layer-output error e H e^T of the channel (nearest rounding) with the
    channel's other groups at their current ranges (exact cross terms); the groups are visited in
    order `sweeps` times, every channel at once. Scales are float16 as stored (half=False: float32)."""
    return group_clips(w, [spec], hessian, ratios, sweeps, half)[0]


def group_clips(w: torch.Tensor, specs: list[QuantSpec], hessian: torch.Tensor,
                ratios: tuple[float, ...] = tuple(1.0 - 0.04 * i for i in range(13)), sweeps: int = 2,
                half: bool = True) -> list[QuantizedTensor]:
    """`_input_weighted_group_clip` of one weight at several widths (specs of one group size), in one
    pass: the rows of every width are stacked (each row's choice depends only on its own error), so
    the group loop runs once for all of them, every candidate ratio of a group at once. In float32
    (the rounding of the stored grid is float32 too); a ratio replaces the current one only when it
    lowers the error, the first of equal ones. Above WIDE_K: `_diagonal_group_ratios`."""
    g = specs[0].group
    if any(sp.group != g or not sp.symmetric for sp in specs):
        raise SettingsError("group clips at several widths need one group size and symmetric grids")
    store = _half if half else (lambda t: t.clamp_min(torch.finfo(torch.float32).tiny).float())
    c = w.shape[0]
    w1 = w.detach().to(torch.float32).reshape(c, -1)
    if w1.shape[1] > WIDE_K:
        return _group_grids(w, w1, specs, *_diagonal_group_ratios(w1, specs, torch.diagonal(hessian), ratios, store),
                            store)
    nw = len(specs)
    w2 = w1.repeat(nw, 1)  # (nw * c, K): width after width
    rows, k = w2.shape
    qmax = torch.cat([torch.full((c, 1), float(sp.qmax)) for sp in specs])
    qmin = -qmax - 1
    ng = group_count(k, g)
    h = hessian.to(torch.float32)
    amax = torch.nn.functional.pad(w2.abs(), (0, ng * g - k)).reshape(rows, ng, g).amax(2)
    cuts = [slice(i * g, min((i + 1) * g, k)) for i in range(ng)]
    cand = torch.tensor(tuple(ratios))

    def err(cols: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # rounding error of the columns on ranges a
        s = store(a / qmax[:, 0])[..., None]
        return torch.clamp((cols / s).round(), qmin, qmax) * s - cols

    ratio = torch.ones(rows, ng)
    e = torch.cat([err(w2[:, cut], amax[:, i]) for i, cut in enumerate(cuts)], 1)
    he = e @ h
    # one group per row (a per-channel range): its best ratio does not depend on other groups, so a
    # second sweep would only repeat the first
    for _ in range(1 if ng == 1 else sweeps):
        for i, cut in enumerate(cuts):
            eg, heg, hgg = e[:, cut], he[:, cut], h[cut, cut]
            new = err(w2[:, cut].expand(len(cand), -1, -1), amax[:, i][None, :] * cand[:, None])  # (n, rows, g)
            d = new - eg
            delta = 2 * (d * heg).sum(2) + ((d @ hgg) * d).sum(2)  # change of e H e^T, (n, rows)
            # candidate 0: the current range (no change); argmin takes the first of the least
            pick = torch.argmin(torch.cat([torch.zeros(1, rows), delta]), 0)
            moved = pick > 0
            best_e = torch.where(moved[:, None], new[(pick - 1).clamp_min(0), torch.arange(rows)], eg)
            he += (best_e - eg) @ h[cut, :]
            e[:, cut] = best_e
            ratio[:, i] = torch.where(moved, cand[(pick - 1).clamp_min(0)], ratio[:, i])
    return _group_grids(w, w1, specs, amax, ratio, store)


def _diagonal_group_ratios(w1: torch.Tensor, specs: list[QuantSpec], hdiag: torch.Tensor, ratios: tuple[float, ...],
                           store) -> tuple[torch.Tensor, torch.Tensor]:
    """group_clips' choice of ranges for a wide weight (K > WIDE_K): each weight's rounding error
    weighted by the diagonal of H alone, sum_j H_jj e_j^2, so a group's error is its own and one
    pass takes every group's best ratio, without group_clips' rows x K^2 cross terms. As there, the
    full range (ratio 1) stays unless a ratio lowers the error, the first of equal ones. w1: the
    (C, K) float32 weight; returns the groups' max|w| and ratios, (len(specs) * C, groups), width
    after width."""
    c, k = w1.shape
    g, nw = specs[0].group, len(specs)
    ng = group_count(k, g)
    qmax = torch.cat([torch.full((c, 1), float(sp.qmax)) for sp in specs])
    hd = hdiag.to(torch.float32)
    amax = torch.nn.functional.pad(w1.abs(), (0, ng * g - k)).reshape(c, ng, g).amax(2).repeat(nw, 1)
    cand = torch.tensor((1.0,) + tuple(ratios))
    ratio = torch.empty(nw * c, ng)
    for i in range(ng):
        cut = slice(i * g, min((i + 1) * g, k))
        cols = w1[:, cut].repeat(nw, 1)
        s = store(amax[:, i][None, :] * cand[:, None] / qmax[:, 0])[..., None]  # (candidates, rows, 1)
        e = torch.clamp((cols / s).round(), -qmax - 1, qmax) * s - cols
        ratio[:, i] = cand[torch.argmin((e * e * hd[cut]).sum(2), 0)]
    return amax, ratio


def _group_grids(w: torch.Tensor, w1: torch.Tensor, specs: list[QuantSpec], amax: torch.Tensor, ratio: torch.Tensor,
                 store) -> list[QuantizedTensor]:
    """group_clips' grids from the chosen ranges: amax * ratio per group ((len(specs) * C, groups),
    width after width), each weight of w1 (C, K) rounded to its group's scale."""
    c, k = w1.shape
    g = specs[0].group
    ng = group_count(k, g)
    out = []
    for j, sp in enumerate(specs):
        rs = slice(j * c, (j + 1) * c)
        scale = store(amax[rs] * ratio[rs] / sp.qmax)
        q = (w1 / group_columns(scale, k, g)).round().clamp(sp.qmin, sp.qmax)
        out.append(QuantizedTensor(q=q.to(torch.int16).reshape(w.shape), scale=scale,
                                   zero_point=torch.zeros(c, ng, dtype=torch.int16), spec=sp))
    return out


def gptq_round(w: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor, damp: float = 0.01,
               block: int = 128, act_order: bool = False) -> QuantizedTensor:
    """Error-feedback rounding (GPTQ, Frantar et al. 2023) on the grid of `qt`.

    w: the weight (C_out, ...), flattened to (C_out, K) in the order of torch's unfold (channel,
    kernel row, kernel column); hessian: (K, K) second moment of the layer's input patches.
    Columns are rounded one at a time and the rounding error is pushed onto the columns not yet
    rounded, weighted by the inverse Hessian, so the layer *output* error shrinks. Same grid
    (scale, zero point; per group with spec.group: static groups, fixed before the rounding, so
    act-order may visit a group's columns in any order) as qt: only the integer values change. damp: added to the diagonal, as a
    fraction of its mean; act_order: round the columns by descending Hessian diagonal (the inputs
    with the most energy first, while the most columns are left to absorb their error).
    """
    return gptq_round_many(w, [qt], hessian, damp, block, act_order)[0]


def gptq_round_many(w: torch.Tensor, qts: list[QuantizedTensor], hessian: torch.Tensor, damp: float = 0.01,
                    block: int = 128, act_order: bool = False) -> list[QuantizedTensor]:
    """`gptq_round` of one weight on several grids (e.g. one per width) in one pass: the inverse
    Hessian is factored once and the rows of every grid are rounded together (GPTQ treats each
    output row on its own). Above WIDE_K: `_gptq_spans`."""
    n = len(qts)
    c = w.shape[0]
    w1 = w.detach().to(torch.float32).reshape(c, -1)
    k = w1.shape[1]
    if k > WIDE_K:
        return _gptq_spans(w, w1, qts, hessian, damp, block, act_order)
    w2 = w1.repeat(n, 1)  # (n * c, K): grid after grid
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w2[:, dead] = 0.0
    cols = [qt.columns() for qt in qts]  # per weight (C, K): a channel's scale, or its group's
    scale = torch.cat([sc for sc, _ in cols])
    zp = torch.cat([z for _, z in cols])
    qmin = torch.cat([torch.full((c, 1), float(qt.spec.qmin)) for qt in qts])
    qmax = torch.cat([torch.full((c, 1), float(qt.spec.qmax)) for qt in qts])
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w2, h, scale, zp = w2[:, perm], h[perm][:, perm], scale[:, perm], zp[:, perm]
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diag(h).mean())
    h32 = h.to(torch.float32)  # damped: float32 factors as GPTQ's own code (half the time of float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h32)), upper=True)
    q = _gptq_columns(w2, scale, zp, qmin, qmax, hinv, block)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return [QuantizedTensor(q=q[i * c:(i + 1) * c].to(torch.int16).reshape(w.shape), scale=qt.scale,
                            zero_point=qt.zero_point, spec=qt.spec) for i, qt in enumerate(qts)]


def _gptq_spans(w: torch.Tensor, w1: torch.Tensor, qts: list[QuantizedTensor], hessian: torch.Tensor, damp: float,
                block: int, act_order: bool) -> list[QuantizedTensor]:
    """gptq_round_many for a wide weight w1 (C, K > WIDE_K): the columns (by descending Hessian
    diagonal with act_order) are taken in spans of WIDE_K, and each span is rounded by GPTQ with its
    own diagonal block of H, alone: a column's rounding error is pushed onto the later columns of its
    span only. The damping is that of the whole H (damp times its diagonal's mean). O(rows K WIDE_K)
    time and WIDE_K^2 memory instead of rows K^2, K^3 and several K x K copies; the grids are
    rounded one after the other, so the (C, span) arrays are those of one grid at a time."""
    c, k = w1.shape
    diag = torch.diagonal(hessian).to(torch.float64)
    dead = diag <= 0
    diag = torch.where(dead, torch.ones_like(diag), diag)
    shift = damp * diag.mean()
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(k)
    qs = [torch.empty(c, k, dtype=torch.int16) for _ in qts]
    for s0 in range(0, k, WIDE_K):
        idx = order[s0:s0 + WIDE_K]
        h = hessian[idx[:, None], idx[None, :]].to(torch.float32)  # damped in float32: no float64 block
        h.diagonal()[dead[idx]] = 1.0
        h.diagonal().add_(shift)
        h = torch.linalg.cholesky(h)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(h), upper=True)
        del h
        for q, qt in zip(qs, qts):
            w2 = w1[:, idx]
            w2[:, dead[idx]] = 0.0
            scale, zp = qt.columns(idx)
            q[:, idx] = _gptq_columns(w2, scale, zp, torch.full((c, 1), float(qt.spec.qmin)),
                                      torch.full((c, 1), float(qt.spec.qmax)), hinv, block).to(torch.int16)
    return [QuantizedTensor(q=q.reshape(w.shape), scale=qt.scale, zero_point=qt.zero_point, spec=qt.spec)
            for q, qt in zip(qs, qts)]


def _gptq_columns(w2: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor,
                  hinv: torch.Tensor, block: int) -> torch.Tensor:
    """GPTQ's column loop: the integers (as floats) of the rows w2 (rows, K) on the per-weight scale
    and zero point (rows, K) and per-row qmin/qmax (rows, 1), with hinv the upper Cholesky factor of
    the damped inverse Hessian (K, K) in that column order; w2 is updated in place."""
    k = w2.shape[1]
    q = torch.empty_like(w2)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb = w2[:, i0:i1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col = wb[:, j:j + 1]
            sc, zc = scale[:, i0 + j:i0 + j + 1], zp[:, i0 + j:i0 + j + 1]
            qc = torch.clamp((col / sc + zc).round(), qmin, qmax)
            q[:, i0 + j:i0 + j + 1] = qc
            e = (col - (qc - zc) * sc) / hb[j, j]
            wb[:, j + 1:] -= e @ hb[j:j + 1, j + 1:]
            err[:, j:j + 1] = e
        w2[:, i1:] -= err @ hinv[i0:i1, i1:]
    return q
