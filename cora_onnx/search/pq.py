"""Product quantization: "And the Bit Goes Down" (Stock et al., ICLR 2020) on a BN-folded model.

Per Conv/Linear layer every output filter, flattened in (C_in/groups, kh, kw) order, is cut into
sub-vectors of `block_size` values (the layout of `plan.Codebook`); one codebook of up to 256
codewords per layer (uint8 codes). The codebook is fitted by an EM whose objective is the error
on the layer's outputs for in-domain inputs, sum_j (w_j - w^_j)^T H_b (w_j - w^_j), H_b the second
moment of the inputs that sub-vector j multiplies (the diagonal d x d blocks of the unfolded-input
second moment; the paper's objective ||x W - x W^||^2 without the cross terms between blocks).
With bias correction (the default) H is the covariance instead: the bias absorbs the shift of the
output mean, so only the error on the inputs' variation is left, and the codebook is not spent on
the mean response that dominates the second moment of post-ReLU inputs.

- E-step: every sub-vector to its best codeword under its own H_b, as batched matrix products.
- M-step: codeword c = (sum_j H_bj)^-1 sum_j H_bj w_j over the sub-vectors assigned to c (the
  sums are index_add / one matrix product over the distinct blocks; then a batched solve).
- S-step (our addition, `channel_scale`): a float16 scale per output channel, fitted in closed form.
  The paper quantizes weights *before* BatchNorm, whose per-channel scale stays in float; a
  BN-folded weight carries that scale inside, and codewords shared across channels of very
  different magnitude would waste the codebook. The scale restores the paper's setting.

Layers are quantized in order, each one's input statistics measured on the network whose earlier
layers are already quantized. Then the codewords (and channel scales and biases) are fine-tuned
by distillation from the float network, a codeword's gradient being the mean of the gradients of
the sub-vectors assigned to it. BatchNorm is folded in our models, so instead of re-estimating
BN statistics each layer's bias is corrected so that the mean of its outputs (on the partially
quantized network) matches the float network's: b = E_float[y] - W^ E_q[patch]; the fine-tuning
then trains the biases too.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, ModelError, SettingsError
from ..plan import Codebook, LayerPlan, Plan
from ..progress import progress
from ..quantizers import QuantSpec, quantizable_layers, quantize_weight
from ..torch_images import as_torch
from .layers import LayerSelection, is_depthwise, layer_kind, select_layers, uniform_from
from .options import CliOption

__all__ = ["PqSettings", "PqFit", "search_pq", "fit_codebook", "weighted_error", "block_kind", "parse_block_size",
           "pq_report", "PQ_OPTIONS", "BLOCK_PRESETS", "assign_with_feedback", "full_error",
           "float_target", "TARGETS"]

log = logging.getLogger(__name__)

BLOCK_PRESETS = ("small", "large")
TARGETS = ("weight", "float")
_FIXED_KINDS = ("1x1", "kxk", "depthwise", "linear")
_CHUNK = 1 << 22  # elements per chunk of the n x k distance matrix / of unfolded inputs
DAMPING = 1e-2  # fit_codebook's ridge, relative to the layer's mean input energy per coordinate


def block_kind(m: nn.Module) -> str:
    """"linear", "depthwise", "1x1" or "<kh>x<kw>" (e.g. "3x3")."""
    if isinstance(m, nn.Linear):
        return "linear"
    if is_depthwise(m):
        return "depthwise"
    kh, kw = m.kernel_size
    return f"{kh}x{kw}"


def _valid_kind(kind: str) -> bool:
    if kind in _FIXED_KINDS:
        return True
    a, _, b = kind.partition("x")
    return a.isdigit() and b.isdigit() and int(a) >= 1 and int(b) >= 1


def parse_block_size(text: Any) -> tuple[tuple[str, int], ...]:
    """"1x1=8,3x3=18,linear=8,_conv_head=8" (or a mapping) -> ((key, d), ...): the kernel kinds
    (1x1, kxk = every kernel larger than 1x1, <kh>x<kw> e.g. 3x3, depthwise, linear) sorted, then
    the layer-name patterns (any other key, fnmatch-style, e.g. `_blocks.1?._project_conv`) in
    the order given."""
    if isinstance(text, Mapping):
        items = list(text.items())
    elif isinstance(text, (tuple, list)):
        items = [tuple(p) for p in text]
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise SettingsError(f"block_size entries must be KIND=SIZE or LAYER=SIZE (e.g. 1x1=4,3x3=9,"
                                    f"_conv_head=8), got {part.strip()!r}")
            items.append((key.strip(), value.strip()))
    kinds: dict[str, int] = {}
    names: dict[str, int] = {}
    for key, value in items:
        key = str(key).strip()
        if not key:
            raise SettingsError(f"block_size entry without a kind or layer name: ={value}")
        try:
            d = int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"block_size for {key} must be a positive integer, got {value!r}") from None
        if isinstance(value, bool) or d < 1 or str(d) != str(value).strip():
            raise SettingsError(f"block_size for {key} must be a positive integer, got {value!r}")
        if _valid_kind(key.lower()):
            kinds[key.lower()] = d
        else:
            names[key] = d
    return tuple(sorted(kinds.items())) + tuple(names.items())


@dataclass(frozen=True)
class PqSettings:
    """bits: not used by PQ (its rate is log2(codewords) / block_size bits per weight; accepted
    because every method receives --bits). blocks: "small" (d = kh*kw for k x k kernels, 4 for
    1x1 and linear) or "large" (2*kh*kw, 8); depthwise kernels are one block in both. block_size:
    per-kind and per-layer overrides ("3x3=18,1x1=8,_conv_head=8"; see `parse_block_size`; a layer
    pattern wins over the kinds; an explicit size that does not divide a layer is an
    error, a preset size that does not falls back to the small one). codewords: per layer, 1-256
    (uint8 codes). em_iters: EM iterations per layer. finetune_steps / finetune_lr / batch_size:
    distillation fine-tuning (Adam) of codewords, channel scales and biases; 0 steps skips it;
    finetune_biases=False keeps the (corrected) biases fixed, finetune_last=False keeps the last
    product-quantized layer (the classifier) fixed: both can carry the class prior of the
    calibration images into the model.
    calib_size: calibration images used (fine-tuning); stats_size: a subset of them used for each
    layer's input statistics and the float output means of the bias correction (one forward per layer: the search's main cost). channel_scale: a float16
    scale per output channel; bias_correction: match each layer's output mean to the float
    network's. error_feedback: after the EM, assign the codes block by block over the filter,
    each block's error compensated in the blocks not yet assigned (GPTQ-style, with the full
    input covariance, which the EM's block-diagonal objective ignores). damping: the EM's ridge
    (see `fit_codebook`), relative to the layer's mean input energy. target: what each layer's
    quantized weight W^ is fitted to on the partially quantized network's inputs X_q: "weight",
    the layer's own float weight (min ||X_q W - X_q W^||^2; errors of earlier layers pass through
    uncorrected), or "float", the float network's output of the layer (min ||X_f W - X_q W^||^2:
    PQ of the target W* = H_qq^-1 H_qf W under the metric H_qq, see `float_target`). seed: initialization and batch order. selection: layers kept on a uniform grid at
    keep_bits (first / last / depthwise) or left in float (skip); every other Conv/Linear is
    product-quantized."""

    bits: int | None = None
    blocks: str = "small"
    block_size: Any = ()
    codewords: int = 256
    em_iters: int = 20
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    batch_size: int = 32
    calib_size: int = 256
    stats_size: int = 64
    channel_scale: bool = True
    bias_correction: bool = True
    error_feedback: bool = True
    finetune_biases: bool = True
    finetune_last: bool = True
    damping: float = DAMPING
    target: str = "float"
    seed: int = 0
    selection: LayerSelection = field(default_factory=lambda: LayerSelection(keep=("first",)))

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int | None = None, why: str = "") -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
                raise SettingsError(f"{name} must be an integer {rng}{why}, got {v!r}")

        if self.bits is not None:
            _int("bits", 1, 32)
        if self.blocks not in BLOCK_PRESETS:
            raise SettingsError(f"blocks must be one of {', '.join(BLOCK_PRESETS)}, got {self.blocks!r}")
        object.__setattr__(self, "block_size", parse_block_size(self.block_size))
        _int("codewords", 1, 256, " (codes are stored in one byte, uint8)")
        _int("em_iters", 1)
        _int("finetune_steps", 0)
        _int("batch_size", 1)
        _int("calib_size", 1)
        _int("stats_size", 1)
        _int("seed", 0)
        if isinstance(self.damping, bool) or not (isinstance(self.damping, (int, float)) and np.isfinite(self.damping)
                                                  and self.damping >= 0):
            raise SettingsError(f"damping must be a number >= 0, got {self.damping!r}")
        if self.target not in TARGETS:
            raise SettingsError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not (isinstance(self.finetune_lr, (int, float)) and np.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise SettingsError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")
        if not isinstance(self.selection, LayerSelection):
            raise SettingsError("selection must be a LayerSelection")

    def layer_patterns(self) -> tuple[str, ...]:
        """The block_size keys that name layers (fnmatch patterns), not kernel kinds."""
        return tuple(k for k, _ in self.block_size if not _valid_kind(k))

    def block_for(self, m: nn.Module, name: str | None = None) -> tuple[int, bool]:
        """(block size, explicitly given) for a Conv2d/Linear module: the first layer-name pattern
        of block_size that matches `name`, else its kernel kind's entry, else the preset."""
        kind = block_kind(m)
        given = dict(self.block_size)
        if name is not None:
            for pattern in self.layer_patterns():
                if fnmatch.fnmatchcase(name, pattern):
                    return given[pattern], True
        if kind in given:
            return given[kind], True
        if kind not in ("linear", "depthwise", "1x1") and "kxk" in given:
            return given["kxk"], True
        if kind in ("linear", "1x1"):
            return (4 if self.blocks == "small" else 8), False
        kk = m.kernel_size[0] * m.kernel_size[1]
        return (kk if kind == "depthwise" or self.blocks == "small" else 2 * kk), False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---- the EM ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PqFit:
    """codewords (k, d) float32, codes (C_out, m) int64, scale (C_out,) float32 or None;
    error: activation-weighted relative error sum (w-w^)^T H (w-w^) / sum w^T H w."""

    codewords: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor | None
    error: float
    iterations: int

    def weight(self) -> torch.Tensor:
        """Decoded sub-vectors, (C_out, m, d)."""
        w = self.codewords[self.codes]
        return w if self.scale is None else w * self.scale[:, None, None]


def _block_index(c_out: int, groups: int, m: int) -> torch.Tensor:
    """(C_out, m) index into H viewed as (groups*m, d, d)."""
    g = torch.arange(c_out) // (c_out // groups)
    return g[:, None] * m + torch.arange(m)[None, :]


def _apply_h(H: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """H_b w_j for every sub-vector: H (G, m, d, d), w (C_out, m, d) -> (C_out, m, d)."""
    G, m, d, _ = H.shape
    return torch.einsum("gbij,gobj->gobi", H, w.reshape(G, -1, m, d)).reshape(w.shape)


def weighted_error(w: torch.Tensor, H: torch.Tensor, w_hat: torch.Tensor) -> float:
    """sum_j (w_j - w^_j)^T H_bj (w_j - w^_j) / sum_j w_j^T H_bj w_j (w, w^: (C_out, m, d))."""
    e = w - w_hat
    num = (e * _apply_h(H, e)).sum()
    den = (w * _apply_h(H, w)).sum().clamp_min(1e-30)
    return float(num / den)


_F16_TINY = 2.0 ** -14  # smallest normal float16


def _round_scaled(C: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codewords and channel scales as stored (float16): the layer's magnitude moves into the
    codewords (max |scale| = 1), and scales of near-dead channels (BN-folded weights can be 1e-10)
    are raised to the smallest normal float16 instead of underflowing to zero: those channels'
    weights are negligible either way, a zero or flushed scale would not be."""
    top = s.abs().max().clamp_min(1e-30)
    C, s = C * top, s / top
    sign = torch.where(s < 0, -1.0, 1.0)
    s = sign * s.abs().clamp_min(_F16_TINY)
    return C.half().float(), s.half().float()


def fit_codebook(w: torch.Tensor, H: torch.Tensor, k: int, iters: int = 20, *, channel_scale: bool = True,
                 damping: float = DAMPING, generator: torch.Generator | None = None) -> PqFit:
    """EM for one layer. w: (C_out, m, d) sub-vectors; H: (G, m, d, d) input second moments per
    group and block (identity blocks give plain k-means); k: codewords (fewer are used when the
    layer has fewer distinct sub-vectors, which are then reproduced exactly).

    damping: the EM minimizes sum_j (w_j - w^_j)^T (H_bj + lam I) (w_j - w^_j) with lam = damping
    times the layer's mean input energy per coordinate (mean diagonal of H). Without it, input
    directions the calibration never excites (dead channels: H_b = 0) leave the assignment
    arbitrary and the codeword update ill-conditioned, so those weights come out anywhere (ResNet-18's
    layer1.0.conv1: relative weight error 2.6 at activation-weighted error 0). With it, such blocks
    fall back to plain k-means and each codeword update is pulled toward its plain centroid;
    `error` is still measured with the undamped H."""
    w = w.detach().float()
    H = H.detach().float()
    O, m, d = w.shape
    G = H.shape[0]
    if H.shape != (G, m, d, d) or O % G:
        raise ValueError(f"H {tuple(H.shape)} does not fit sub-vectors {tuple(w.shape)}")
    if not (isinstance(damping, (int, float)) and np.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    n = O * m
    gen = generator or torch.Generator().manual_seed(0)
    wf = w.reshape(n, d)
    wHw = float((wf * _apply_h(H, w).reshape(n, d)).sum().clamp_min(1e-30))  # undamped, for `error`
    energy = float(torch.diagonal(H, dim1=2, dim2=3).mean().clamp_min(1e-30))
    H_obj = H
    H = H + max(damping, 1e-6) * energy * torch.eye(d)  # 1e-6: the solve's floor when damping is 0
    Hf = H.reshape(G * m, d, d)
    hidx = _block_index(O, G, m).reshape(n)
    Hw = _apply_h(H, w).reshape(n, d)
    owner = torch.arange(n) // m  # output channel of each sub-vector

    if channel_scale:
        s = w.reshape(O, -1).pow(2).mean(1).sqrt()
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = torch.ones(O)
    v = wf / s[owner, None]
    uniq = torch.unique(v, dim=0)
    if uniq.shape[0] <= k:
        C = uniq.clone()
    else:
        C = uniq[torch.randperm(uniq.shape[0], generator=gen)[:k]].clone()
    k = C.shape[0]

    def quad(C: torch.Tensor) -> torch.Tensor:  # (G*m, k): c^T H_b c
        return torch.einsum("ki,hij,kj->hk", C, Hf, C)

    def assign(C: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        Hv = Hw / s[owner, None]
        codes = torch.empty(n, dtype=torch.long)
        step = max(1, _CHUNK // max(k, 1))
        for a in range(0, n, step):
            dist = Q[hidx[a:a + step]] - 2.0 * Hv[a:a + step] @ C.T
            codes[a:a + step] = dist.argmin(1)
        return codes

    Q = quad(C)
    codes = assign(C, Q)
    it = 0
    for it in range(1, iters + 1):
        # M-step: weighted Lloyd update, one batched solve for all codewords
        omega = s[owner] ** 2
        counts = torch.zeros(k * G * m).index_add_(0, codes * (G * m) + hidx, omega).reshape(k, G * m)
        A = (counts @ Hf.reshape(G * m, d * d)).reshape(k, d, d).double()
        r = torch.zeros(k, d).index_add_(0, codes, Hw * s[owner, None]).double()
        used = torch.bincount(codes, minlength=k) > 0
        C_new = C.clone()
        C_new[used] = torch.linalg.solve(A[used], r[used].unsqueeze(-1)).squeeze(-1).float()
        if not bool(used.all()):  # empty codewords restart at the worst-reconstructed sub-vectors
            err = (wf - s[owner, None] * C[codes]) * (Hw - s[owner, None] * torch.einsum("nij,nj->ni", Hf[hidx], C[codes]))
            worst = err.sum(1).argsort(descending=True)[: int((~used).sum())]
            C_new[~used] = v[worst]
        C = C_new
        Q = quad(C)
        if channel_scale:  # S-step: least-squares scale per output channel
            num = (C[codes] * Hw).sum(1).reshape(O, m).sum(1)
            den = Q[hidx, codes].reshape(O, m).sum(1)
            s = torch.where(den > 0, num / den.clamp_min(1e-30), s)
            s = torch.where(s.abs() > 0, s, torch.ones_like(s))
        new_codes = assign(C, Q)
        changed = int((new_codes != codes).sum())
        codes = new_codes
        if changed == 0 and not channel_scale:
            break

    # what is stored: float16 codewords and scales; final assignment against the rounded values
    if channel_scale:
        C, s = _round_scaled(C, s)
    else:
        C = C.half().float()
    Q = quad(C)
    codes = assign(C, Q)
    fit = PqFit(C, codes.reshape(O, m), s if channel_scale else None, 0.0, it)
    e = wf - fit.weight().reshape(n, d)
    err = float((e * _apply_h(H_obj, e.reshape(O, m, d)).reshape(n, d)).sum()) / wHw
    return dataclasses.replace(fit, error=err)


def assign_with_feedback(w: torch.Tensor, H: torch.Tensor, fit: PqFit, damp: float = 0.01) -> PqFit:
    """Codes re-assigned block by block (GPTQ order) for a fixed codebook: with U the upper
    Cholesky factor of H^-1, block b is assigned under the metric (U_bb^T U_bb)^-1 and its error E
    updates the later blocks, W_rest -= E U_bb^-1 U_b,rest. w: (C_out, m, d); H: (G, m*d, m*d)
    full input second moment per group (G must divide C_out). Returns the fit with new codes and
    its error measured with the full H (the EM's `error` uses only the diagonal blocks)."""
    O, m, d = w.shape
    G, FF, _ = H.shape
    C, s = fit.codewords, fit.scale if fit.scale is not None else torch.ones(O)
    W = w.reshape(G, O // G, FF).double().clone()
    U = _inverse_cholesky(H.double(), damp)  # (G, FF, FF)
    codes = torch.empty(G, O // G, m, dtype=torch.long)
    sg = s.reshape(G, O // G).double()
    Cd = C.double()
    for b in range(m):
        sl = slice(b * d, (b + 1) * d)
        Ubb = U[:, sl, sl]
        Minv = torch.linalg.inv(Ubb.transpose(1, 2) @ Ubb)  # (G, d, d): metric of this block
        v = W[:, :, sl] / sg[..., None]  # (G, O/G, d)
        quad = torch.einsum("ki,gij,kj->gk", Cd, Minv, Cd)  # (G, k)
        cross = torch.einsum("goi,gij,kj->gok", v, Minv, Cd)
        code = (quad[:, None, :] - 2.0 * cross).argmin(-1)
        codes[:, :, b] = code
        E = W[:, :, sl] - sg[..., None] * Cd[code]
        if b + 1 < m:
            W[:, :, (b + 1) * d:] -= E @ torch.linalg.solve(Ubb, U[:, sl, (b + 1) * d:])
    new = dataclasses.replace(fit, codes=codes.reshape(O, m))
    return dataclasses.replace(new, error=full_error(w, H, new.weight()))


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean diag * I)^-1, per group; the damping grows tenfold
    (at most three times) while rounding leaves the inverse not numerically positive definite."""
    FF = H.shape[-1]
    H = (H + H.transpose(1, 2)) / 2
    scale = torch.diagonal(H, dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * scale * torch.eye(FF, dtype=H.dtype))
        if not bool(info.any()):
            inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex((inv + inv.transpose(1, 2)) / 2, upper=True)
            if not bool(info.any()):
                return U
        if attempt < 3:
            log.info("error feedback: input covariance not numerically positive definite at damping %g; using %g",
                     damp, 10 * damp)
            damp *= 10
    raise ModelError("error feedback: the input covariance is not positive definite even with damping "
                     f"{damp:g} (non-finite inputs?)")


def full_error(w: torch.Tensor, H: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative output error with the full input second moment H (G, m*d, m*d)."""
    G, FF, _ = H.shape
    E = (w - w_hat).reshape(G, -1, FF).double()
    Wo = w.reshape(G, -1, FF).double()
    return float(torch.einsum("goi,gij,goj->", E, H.double(), E)
                 / torch.einsum("goi,gij,goj->", Wo, H.double(), Wo).clamp_min(1e-30))


def float_target(w: torch.Tensor, H_qq: torch.Tensor, H_qf: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """The weight whose output on the quantized network's inputs best matches the float network's
    output of the layer: argmin_v ||X_f w - X_q v||^2 + lam ||v - w||^2 per output row, i.e.
    W* = (H_qq + lam I)^-1 (H_qf W^T + lam W^T) per group, lam = damping times the mean diagonal of
    H_qq over all groups (as in `fit_codebook`: input directions the calibration never excites keep the float
    weight instead of going to zero). Then ||X_f w - X_q v||^2 = (v - w*)^T H_qq (v - w*) + const,
    so PQ of W* under H_qq minimizes the error against the float network. w: (C_out, F); H_qq =
    E[x_q x_q^T], H_qf = E[x_q x_f^T]: (G, F, F), G groups dividing C_out. Returns (C_out, F)."""
    O, FF = w.shape
    G = H_qq.shape[0]
    if H_qq.shape != (G, FF, FF) or H_qf.shape != H_qq.shape or O % G:
        raise ValueError(f"H_qq {tuple(H_qq.shape)} / H_qf {tuple(H_qf.shape)} do not fit a weight {tuple(w.shape)}")
    Hq, Hx = H_qq.double(), H_qf.double()
    # the layer's mean energy, not each group's: a depthwise channel whose input is dead on the calibration
    # images must keep its float weight, not get an arbitrary one (EfficientNet-Lite0 _blocks.8 with a
    # per-group ridge: relative weight MSE 27 at the same output error)
    lam = max(damping, 1e-6) * float(torch.diagonal(Hq, dim1=1, dim2=2).mean().clamp_min(1e-30))
    Wt = w.reshape(G, O // G, FF).transpose(1, 2).double()  # (G, F, O/G)
    A = (Hq + Hq.transpose(1, 2)) / 2 + lam * torch.eye(FF, dtype=torch.float64)
    target = torch.linalg.solve(A, Hx @ Wt + lam * Wt)
    return target.transpose(1, 2).reshape(O, FF).to(w.dtype)


def float_output_error(w: torch.Tensor, w_hat: torch.Tensor, S: dict) -> float:
    """||X_f w - X_q w^||^2 / ||X_f w||^2 from the joint statistics of `_joint_stats` (w, w^: (C_out, F))."""
    G, FF, _ = S["qq"].shape
    Wf = w.reshape(G, -1, FF).double()
    Wq = w_hat.reshape(G, -1, FF).double()
    ff = torch.einsum("goi,gij,goj->", Wf, S["ff"].double(), Wf)
    num = ff - 2 * torch.einsum("goi,gij,goj->", Wq, S["qf"].double(), Wf) + torch.einsum(
        "goi,gij,goj->", Wq, S["qq"].double(), Wq)
    return float(num / ff.clamp_min(1e-30))


# ---- statistics on the (partially quantized) network ---------------------------------------------
class _Stop(Exception):
    pass


@dataclass(frozen=True)
class _Geom:
    name: str
    kind: str
    d: int
    groups: int
    m: int


def _unfold(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> (N, C_in*kh*kw, L) patches (Linear: (N, C_in, 1))."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    pad = mod.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        elif all(k % 2 for k in mod.kernel_size):
            pad = tuple(dl * (k - 1) // 2 for k, dl in zip(mod.kernel_size, mod.dilation))
        else:
            raise ModelError("padding='same' with an even kernel is not supported by pq")
    return F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)


def _input_stats(model: nn.Module, mod: nn.Module, geom: _Geom, images, batch_size: int, full: bool = False,
                 centered: bool = False):
    """H (G, m, d, d) and mean patch (G, m*d) of `mod`'s input over the images; the forward
    stops right after the layer's input is seen. full: H is the whole (G, m*d, m*d) second
    moment per group instead of its diagonal blocks. centered: H is the covariance E[(x-mu)(x-mu)^T]
    instead of the second moment E[x x^T] (the error left once the bias absorbs the mean shift)."""
    G, m, d = geom.groups, geom.m, geom.d
    if full:
        m, d = 1, m * d  # one block of the whole filter: the same code gives the full matrix
    H = torch.zeros(G * m, d, d, dtype=torch.float64)
    mu = torch.zeros(G * m * d, dtype=torch.float64)
    count = [0]

    def hook(_mod, inputs):
        cols = _unfold(_mod, inputs[0].detach().float())
        N, FF, L = cols.shape
        step = max(1, _CHUNK // max(FF * L, 1))
        for a in range(0, N, step):
            c = cols[a:a + step]
            mu.add_(c.sum((0, 2)).double())
            x = c.reshape(c.shape[0], G * m, d, L).permute(1, 2, 0, 3).reshape(G * m, d, -1)
            H.add_(torch.bmm(x, x.transpose(1, 2)).double())
        count[0] += N * L
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in images.batches(batch_size):
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if count[0] == 0:
        raise ModelError(f"layer {geom.name} was never called by the model's forward")
    n = float(count[0])
    H, mu = H / n, mu / n
    if centered:
        mb = mu.reshape(G * m, d)
        H = H - mb[:, :, None] * mb[:, None, :]
    return H.float().reshape(G, m, d, d), mu.float().reshape(G, m * d)


def _layer_input(model: nn.Module, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
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
        raise ModelError("a layer was never called by the model's forward")
    return seen[0]


def _joint_stats(teacher: nn.Module, tmod: nn.Module, student: nn.Module, smod: nn.Module, geom: _Geom, images,
                 batch_size: int, centered: bool = False) -> dict:
    """Full per-group statistics of the layer's input patches on the partially quantized network
    (x_q, `student`) and on the float network (x_f, `teacher`) for the same images: "qq" E[x_q x_q^T],
    "qf" E[x_q x_f^T], "ff" E[x_f x_f^T] (G, F, F), "mu_q" / "mu_f" (G, F); centered: covariances."""
    G = geom.groups
    FF = geom.m * geom.d
    acc = {k: torch.zeros(G, FF, FF, dtype=torch.float64) for k in ("qq", "qf", "ff")}
    sums = {k: torch.zeros(G, FF, dtype=torch.float64) for k in ("q", "f")}
    count = 0
    for x in images.batches(batch_size):
        xq, xf = _layer_input(student, smod, x), _layer_input(teacher, tmod, x)
        per_image = xq[:1].numel() * max(1, int(np.prod(smod.kernel_size)) if isinstance(smod, nn.Conv2d) else 1)
        step = max(1, _CHUNK // per_image)
        for a in range(0, xq.shape[0], step):
            cq, cf = _unfold(smod, xq[a:a + step]), _unfold(smod, xf[a:a + step])
            N, _, L = cq.shape
            cq, cf = (c.reshape(N, G, FF, L).permute(1, 2, 0, 3).reshape(G, FF, -1) for c in (cq, cf))
            acc["qq"].add_(torch.bmm(cq, cq.transpose(1, 2)).double())
            acc["qf"].add_(torch.bmm(cq, cf.transpose(1, 2)).double())
            acc["ff"].add_(torch.bmm(cf, cf.transpose(1, 2)).double())
            sums["q"].add_(cq.sum(2).double())
            sums["f"].add_(cf.sum(2).double())
            count += N * L
    n = float(count)
    out = {k: v / n for k, v in acc.items()}
    mu_q, mu_f = sums["q"] / n, sums["f"] / n
    if centered:
        out["qq"] = out["qq"] - mu_q[:, :, None] * mu_q[:, None, :]
        out["qf"] = out["qf"] - mu_q[:, :, None] * mu_f[:, None, :]
        out["ff"] = out["ff"] - mu_f[:, :, None] * mu_f[:, None, :]
    out = {k: v.float() for k, v in out.items()}
    out["mu_q"], out["mu_f"] = mu_q.float(), mu_f.float()
    return out


def _output_means(model: nn.Module, mods: dict[str, nn.Module], images, batch_size: int) -> dict[str, torch.Tensor]:
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


# ---- search --------------------------------------------------------------------------------------
def _diagonal_blocks(H: torch.Tensor, geom: _Geom) -> torch.Tensor:
    """(G, ..., m*d, m*d) full per-group matrix -> its (G, m, d, d) diagonal blocks."""
    G, m, d = geom.groups, geom.m, geom.d
    return torch.diagonal(H.reshape(G, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()


def _geometry(name: str, mod: nn.Module, settings: PqSettings) -> _Geom:
    d, explicit = settings.block_for(mod, name)
    w = mod.weight
    per_filter = int(w[0].numel())
    groups = 1 if isinstance(mod, nn.Linear) else int(mod.groups)
    kind = block_kind(mod)
    if per_filter % d:
        if explicit:
            raise SettingsError(f"block size {d} does not divide layer {name} ({kind}, {per_filter} weights per "
                                f"output channel, shape {tuple(w.shape)})")
        small = PqSettings(blocks="small").block_for(mod)[0]
        log.info("%s: %s block size %d does not divide %d weights per filter; using %d", name, settings.blocks, d,
                 per_filter, small)
        d = small
    return _Geom(name, kind, d, groups, per_filter // d)


def _codebook_weight(cw: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, shape) -> torch.Tensor:
    w = cw[codes]
    if scale is not None:
        w = w * scale[:, None, None]
    return w.reshape(shape)


def _stored_bias(b: torch.Tensor) -> np.ndarray:
    """float16 (half the bytes; its rounding, 2^-11 of each value, is far below the PQ error) unless
    a value is out of float16's range, then float32."""
    b16 = b.half()
    return (b16 if bool(torch.isfinite(b16).all()) else b.float()).numpy()


def search_pq(model: nn.Module, settings: PqSettings, calib=None) -> Plan:
    """Product-quantize every selected Conv2d/Linear of a BN-folded model (see module doc)."""
    if calib is None or len(calib) == 0:
        raise DataError("pq needs calibration images")
    model = model.eval()
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError("the model has no Conv2d/Linear layer to quantize")
    # which layers: keep -> uniform at keep_bits, skip -> float, the rest -> PQ (validated first)
    kept = {n: b for n, b in select_layers(layers, 0, settings.selection).items() if b}
    order = [n for n in layers if n not in settings.selection.skip]
    geoms = {n: _geometry(n, layers[n], settings) for n in order if n not in kept}
    for pattern in settings.layer_patterns():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in geoms):
            shown = ", ".join(list(geoms)[:6]) + (", ..." if len(geoms) > 6 else "")
            raise SettingsError(f"block_size entry {pattern!r} is neither a kernel kind (1x1, kxk, <kh>x<kw>, "
                                f"depthwise, linear) nor the name of a product-quantized layer ({shown})")
    images = as_torch(calib).subset(settings.calib_size, settings.seed)
    stats_images = images.subset(settings.stats_size, settings.seed)
    bs = settings.batch_size
    gen = torch.Generator().manual_seed(settings.seed)
    t_start = time.perf_counter()

    student = copy.deepcopy(model).eval()
    slayers = quantizable_layers(student)
    # the float output means on the very images the student's input means come from: on other
    # images the sampling difference of the two means goes into the bias (EfficientNet-Lite0:
    # 8.5% relative error in the first depthwise layer's output mean with 64 vs 16 images)
    targets = _output_means(model, layers, stats_images, bs) if settings.bias_correction else {}
    state: dict[str, dict] = {}
    plans: dict[str, LayerPlan] = {}
    for name in progress(order, len(order), "pq: layers", "layers"):
        mod = slayers[name]
        t0 = time.perf_counter()
        w = mod.weight.detach().float().clone()
        if name in kept:
            qt = quantize_weight(w, QuantSpec(bits=kept[name]))
            with torch.no_grad():
                mod.weight.copy_(qt.dequantize())
            err = float((qt.dequantize() - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-30))
            plans[name] = LayerPlan(name=name, kind=layer_kind(mod), shape=tuple(w.shape), uniform=uniform_from(qt),
                                    info={"relative_weight_mse": err})
            log.info("%s: uniform %d bits (kept), relative weight MSE %.3g", name, kept[name], err)
            continue
        g = geoms[name]
        feedback = settings.error_feedback and g.m > 1
        # with bias correction the mean shift of the output is absorbed by the bias: fit the covariance.
        # Post-ReLU inputs have means far above their spread, and the second moment would spend the
        # codebook on the mean response
        joint = None
        if settings.target == "float":  # fit the float network's output: PQ of W* under H_qq
            joint = _joint_stats(model, layers[name], student, mod, g, stats_images, bs,
                                 centered=settings.bias_correction)
            H, mu = joint["qq"].reshape(g.groups, 1, g.m * g.d, g.m * g.d), joint["mu_q"]
            wv = float_target(w.reshape(w.shape[0], -1), joint["qq"], joint["qf"], settings.damping)
            wv = wv.reshape(w.shape[0], g.m, g.d)
            if not feedback:
                H = _diagonal_blocks(H, g)
        else:
            H, mu = _input_stats(student, mod, g, stats_images, bs, full=feedback, centered=settings.bias_correction)
            wv = w.reshape(w.shape[0], g.m, g.d)
        Hfull = None
        if feedback:  # diagonal blocks for the EM, the full matrix for the sequential assignment
            Hfull = H.reshape(g.groups, g.m * g.d, g.m * g.d)
            H = _diagonal_blocks(H, g)
        fit = fit_codebook(wv, H, settings.codewords, settings.em_iters, channel_scale=settings.channel_scale,
                           damping=settings.damping, generator=gen)
        extra = {}
        if joint is not None:  # the error if this layer stayed float, and if it were the exact target W*
            wflat = w.reshape(w.shape[0], -1)
            extra["float_output_error_of_float_weight"] = float_output_error(wflat, wflat, joint)
            extra["float_output_error_of_target"] = float_output_error(wflat, wv.reshape(w.shape[0], -1), joint)
        if Hfull is not None:
            extra["full_error_without_feedback"] = full_error(wv, Hfull, fit.weight())
            fit = assign_with_feedback(wv, Hfull, fit)
            log.debug("%s: full-covariance error %.4f without feedback, %.4f with", name,
                      extra["full_error_without_feedback"], fit.error)
        w_hat = fit.weight()
        if joint is not None:
            extra["float_output_error"] = float_output_error(w.reshape(w.shape[0], -1), w_hat.reshape(w.shape[0], -1),
                                                             joint)
        with torch.no_grad():
            mod.weight.copy_(w_hat.reshape(w.shape))
            bias = mod.bias.detach().clone() if mod.bias is not None else torch.zeros(w.shape[0])
            if settings.bias_correction:
                gidx = torch.arange(w.shape[0]) // (w.shape[0] // g.groups)
                bias = targets[name] - (w_hat.reshape(w.shape[0], -1) * mu[gidx]).sum(1)
            if mod.bias is None:
                mod.bias = nn.Parameter(bias.clone())
            else:
                mod.bias.copy_(bias)
        state[name] = {"codewords": fit.codewords, "codes": fit.codes, "scale": fit.scale, "bias": bias.float()}
        werr = float((w_hat.reshape(w.shape) - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-30))
        plans[name] = LayerPlan(name=name, kind=layer_kind(mod), shape=tuple(w.shape), info={
            "block_kind": g.kind, "block_size": g.d, "codewords": int(fit.codewords.shape[0]),
            "activation_weighted_error": fit.error, **extra, "relative_weight_mse": werr,
            "em_iterations": fit.iterations,
            "seconds": time.perf_counter() - t0})
        log.info("%s: %s d=%d k=%d, activation-weighted error %.4f%s, relative weight MSE %.4f (%.1f s)", name,
                 g.kind, g.d, fit.codewords.shape[0], fit.error,
                 (f" (full covariance; {extra['full_error_without_feedback']:.4f} without feedback)"
                  if "full_error_without_feedback" in extra else "")
                 + (f", error vs the float network's output {extra['float_output_error']:.4f} (float weight: "
                    f"{extra['float_output_error_of_float_weight']:.4f}, target W*: "
                    f"{extra['float_output_error_of_target']:.4f})" if joint is not None else ""),
                 werr, time.perf_counter() - t0)

    ft_info: dict = {}
    if settings.finetune_steps and state:
        ft_info = _finetune(model, student, slayers, state, images, settings, gen)

    out = []
    for name in order:
        lp = plans[name]
        if name in state:
            st = state[name]
            cb = Codebook(block_size=geoms[name].d, codewords=st["codewords"].detach().numpy().astype(np.float16),
                          codes=st["codes"].numpy().astype(np.uint8),
                          scale=None if st["scale"] is None else st["scale"].detach().numpy().astype(np.float16),
                          bias=_stored_bias(st["bias"].detach()))
            w = layers[name].weight.detach().numpy()
            w_hat = cb.decode(lp.shape)
            info = {**lp.info, "relative_weight_mse": float(((w_hat - w) ** 2).mean() / max((w ** 2).mean(), 1e-30))}
            lp = dataclasses.replace(lp, codebook=cb, info=info)
        out.append(lp)
    seconds = time.perf_counter() - t_start
    return Plan(method="pq", settings={"method": "pq", **settings.to_json()}, layers=tuple(out),
                meta={"pq_seconds": seconds, "pq_finetune": ft_info})


def _finetune(teacher: nn.Module, student: nn.Module, slayers: dict[str, nn.Module], state: dict[str, dict], images,
              settings: PqSettings, gen: torch.Generator) -> dict:
    """Distillation (soft cross-entropy to the float logits) of codewords, scales and biases."""
    from torch.func import functional_call

    params, shapes = {}, {}
    frozen = set() if settings.finetune_last else {list(state)[-1]}
    for name, st in state.items():
        if name in frozen:
            continue
        cw = st["codewords"].clone().requires_grad_(True)
        k = cw.shape[0]
        counts = torch.bincount(st["codes"].reshape(-1), minlength=k).float().clamp_min(1.0)
        cw.register_hook(lambda g, c=counts: g / c[:, None])  # mean, not sum, of the assigned sub-vectors' grads
        st["codewords"] = cw
        if st["scale"] is not None:
            st["scale"] = st["scale"].clone().requires_grad_(True)
        if settings.finetune_biases:
            st["bias"] = st["bias"].clone().requires_grad_(True)
        shapes[name] = tuple(slayers[name].weight.shape)
        params[name] = [p for p in (cw, st["scale"], st["bias"]) if p is not None and p.requires_grad]
    if not params:
        return {}
    opt = torch.optim.Adam([p for ps in params.values() for p in ps], lr=settings.finetune_lr)
    with torch.no_grad():
        teacher_logits = torch.cat([teacher(x.contiguous(memory_format=torch.channels_last))
                                    for x in images.batches(settings.batch_size)])
    n = len(images)
    student.eval()
    losses = []
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in progress(range(settings.finetune_steps), settings.finetune_steps, "pq: fine-tuning codewords", "steps"):
        if pos + settings.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + settings.batch_size]
        pos += settings.batch_size
        # channels-last input: PyTorch's CPU convolutions (depthwise above all) run ~1.5x faster fwd+bwd
        x = images.preprocess.normalize(images.images[idx]).contiguous(memory_format=torch.channels_last)
        overrides = {}
        for name in params:  # frozen layers keep the weights and biases already in the student
            st = state[name]
            overrides[f"{name}.weight"] = _codebook_weight(st["codewords"], st["codes"], st["scale"], shapes[name])
            overrides[f"{name}.bias"] = st["bias"]
        logits = functional_call(student, overrides, (x,))
        loss = -(F.softmax(teacher_logits[idx], 1) * F.log_softmax(logits, 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for st in (state[name] for name in params):
        for key in ("codewords", "scale", "bias"):
            if st[key] is not None:
                st[key] = st[key].detach()
        if st["scale"] is not None:
            st["codewords"], st["scale"] = _round_scaled(st["codewords"], st["scale"])
        else:
            st["codewords"] = st["codewords"].half().float()
    head = float(np.mean(losses[: max(1, len(losses) // 10)]))
    tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
    # the soft cross-entropy's floor is the teacher's entropy: loss - entropy is the KL to the teacher
    p = F.softmax(teacher_logits, 1)
    entropy = float(-(p * F.log_softmax(teacher_logits, 1)).sum(1).mean())
    log.info("fine-tuning: %d steps, distillation loss %.4f -> %.4f (teacher entropy %.4f: KL %.4f -> %.4f) (%.1f s)",
             len(losses), head, tail, entropy, head - entropy, tail - entropy, time.perf_counter() - t0)
    return {"steps": len(losses), "loss_first": head, "loss_last": tail, "teacher_entropy": entropy,
            "seconds": time.perf_counter() - t0}


# ---- report --------------------------------------------------------------------------------------
def pq_report(plan: Plan) -> dict:
    """The `pq` report section: block sizes, codewords, per-layer error, stored bytes by kind."""
    pq_layers = [lp for lp in plan.layers if lp.codebook is not None]
    codes = sum(lp.codebook.codes.nbytes for lp in pq_layers)
    books = sum(lp.codebook.codewords.nbytes for lp in pq_layers)
    scales = sum(lp.codebook.scale.nbytes for lp in pq_layers if lp.codebook.scale is not None)
    biases = sum(lp.codebook.bias.nbytes for lp in pq_layers if lp.codebook.bias is not None)
    uniform = sum((lp.uniform.stored_bits() + 7) // 8 for lp in plan.layers if lp.uniform is not None)
    sizes = sorted({(lp.info.get("block_kind"), lp.codebook.block_size) for lp in pq_layers})
    return {"pq": {
        "blocks": plan.settings.get("blocks"),
        "block_sizes": {k: d for k, d in sizes},
        "codewords": plan.settings.get("codewords"),
        "layers_pq": len(pq_layers),
        "layers_uniform": sum(lp.uniform is not None for lp in plan.layers),
        "stored_bytes": {"codes": codes, "codewords": books, "channel_scales": scales, "pq_biases": biases,
                         "uniform_layers": uniform},
        "finetune": dict(plan.meta.get("pq_finetune", {})),
        "layers": [{"name": lp.name, "block_kind": lp.info.get("block_kind"), "block_size": lp.codebook.block_size,
                    "codewords": int(lp.codebook.codewords.shape[0]),
                    "activation_weighted_error": lp.info.get("activation_weighted_error"),
                    "relative_weight_mse": lp.info.get("relative_weight_mse"),
                    "bits_per_weight": lp.codebook.stored_bits() / float(np.prod(lp.shape))} for lp in pq_layers],
    }}


PQ_OPTIONS = (
    CliOption("--blocks", "blocks", BLOCK_PRESETS,
              "PQ block sizes: small (kh*kw for k x k kernels, 4 for 1x1/linear) or large (2*kh*kw, 8) [small]."),
    CliOption("--block-size", "block_size", str,
              "PQ block size per kernel kind or layer, e.g. 1x1=8,3x3=18,linear=8,_conv_head=8 (kinds: 1x1, kxk, "
              "3x3, 5x5..., depthwise, linear; any other key is a layer-name pattern, fnmatch-style, and wins over "
              "the kinds); overrides --blocks."),
    CliOption("--codewords", "codewords", int, "PQ codewords per layer, 1-256 (uint8 codes) [256]."),
    CliOption("--em-iters", "em_iters", int, "PQ EM iterations per layer [20]."),
    CliOption("--finetune-steps", "finetune_steps", int, "PQ distillation fine-tuning steps, 0 = none [100]."),
    CliOption("--finetune-lr", "finetune_lr", float, "PQ fine-tuning learning rate (Adam) [1e-4]."),
    CliOption("--calib-size", "calib_size", int, "Calibration images used [256]."),
    CliOption("--stats-size", "stats_size", int,
              "PQ: calibration images for each layer's input statistics (one forward each) [64]."),
    CliOption("--error-feedback/--no-error-feedback", "error_feedback", bool,
              "PQ: assign codes block by block, compensating each block's error in the next ones [on]."),
    CliOption("--channel-scale/--no-channel-scale", "channel_scale", bool,
              "PQ: float16 scale per output channel (BN-folded weights) [on]."),
    CliOption("--finetune-biases/--no-finetune-biases", "finetune_biases", bool,
              "PQ: fine-tune the (corrected) biases too [on]."),
    CliOption("--finetune-last/--no-finetune-last", "finetune_last", bool,
              "PQ: fine-tune the last layer (the classifier) too [on]."),
    CliOption("--damping", "damping", float,
              "PQ: EM ridge toward plain k-means, relative to the layer's mean input energy; keeps weights the "
              "calibration never excites [0.01]."),
    CliOption("--target", "target", TARGETS,
              "PQ: fit each layer to its own float weight (weight) or to the float network's output of the layer "
              "(float: corrects the error of the layers before it; one more forward per layer) [float]."),
    CliOption("--bias-correction/--no-bias-correction", "bias_correction", bool,
              "PQ: correct biases so output means match the float model [on]."),
)
