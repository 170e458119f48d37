"""The codebook of one layer: the Hessian-weighted EM (`fit_codebook`), the GPTVQ-style
sequential assignment (`assign_with_feedback`), the float-network target and the error measures.
Above quantizers.WIDE_K inputs (VGG's classifier, K = 25,088) the assignment and the target work
on spans of about WIDE_K inputs, as CoRa's GPTQ does: their K^3 factorizations, C_out K^2 updates
and float64 K x K copies took hours and tens of GB there. They use only the diagonal span blocks
of the input second moment (`Spans`), which the search accumulates without any K x K."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging

import numpy as np
import torch

from cora_onnx.core.errors import ModelError
from cora_onnx.torch.quantizers import WIDE_K
from cora_onnx.torch.search.pq.settings import DAMPING

__all__ = ["PqFit", "Spans", "span_width", "fit_codebook", "assign_with_feedback", "weighted_error", "full_error",
           "float_target", "float_target_spans", "float_output_error", "inverse_cholesky", "CHUNK"]

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # elements per chunk of the n x k distance matrix / of unfolded inputs


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


def span_width(d: int) -> int:
    """Inputs per span of a layer wider than WIDE_K with blocks of d inputs: as many whole blocks
    as WIDE_K holds."""
    return max(1, WIDE_K // d) * d


def _blocks_of(H: torch.Tensor, d: int) -> torch.Tensor:
    """(G, F, F) -> its (G, F/d, d, d) diagonal d x d blocks."""
    G, FF, _ = H.shape
    return torch.diagonal(H.reshape(G, FF // d, d, FF // d, d), dim1=1, dim2=3).permute(0, 3, 1, 2)


@dataclass(frozen=True, eq=False)
class Spans:
    """What the routes of a layer wider than WIDE_K use of its (G, K, K) input second moment H:
    its diagonal blocks over consecutive spans of `span` inputs (the last one shorter), each
    (G, s, s). K x span values instead of K x K (822 MB in float32 at VGG's K = 25,088 and spans
    of 8,192, not 2.5 GB)."""

    blocks: tuple[torch.Tensor, ...]
    span: int

    @classmethod
    def of(cls, H: torch.Tensor, span: int) -> "Spans":
        """The spans of a whole (G, K, K) matrix (views of it)."""
        return cls(tuple(H[:, a:a + span, a:a + span] for a in range(0, H.shape[-1], span)), span)

    @property
    def groups(self) -> int:
        return int(self.blocks[0].shape[0])

    @property
    def size(self) -> int:
        """K: the inputs of all the spans."""
        return sum(int(b.shape[-1]) for b in self.blocks)

    def diagonal(self) -> torch.Tensor:
        """H's diagonal, (G, K)."""
        return torch.cat([torch.diagonal(b, dim1=1, dim2=2) for b in self.blocks], 1)

    def blocks_of(self, d: int) -> torch.Tensor:
        """H's diagonal d x d blocks, (G, K/d, d, d) (d must divide the span)."""
        if self.span % d:
            raise ValueError(f"blocks of {d} do not tile spans of {self.span}")
        return torch.cat([_blocks_of(b, d) for b in self.blocks], 1)


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
    codewords (max |scale| = 1), and scales of near-dead channels (BN-fused weights can be 1e-10)
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
    s0 = s  # restarts of empty codewords: sub-vectors over their initial scale (no (n, d) copy kept)
    uniq = _unique_rows(wf / s0[owner, None])
    if uniq.shape[0] <= k:
        C = uniq.clone()
    else:
        C = uniq[torch.randperm(uniq.shape[0], generator=gen)[:k]].clone()
    del uniq
    k = C.shape[0]

    def quad(C: torch.Tensor) -> torch.Tensor:  # (G*m, k): c^T H_b c
        return torch.einsum("ki,hij,kj->hk", C, Hf, C)

    per_group = O // G

    def assign(C: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        # dist_j = c^T H_b c - 2 (H_b w_j / s)^T c; the sub-vectors of a chunk of whole output channels of
        # one group take their block's row of Q by broadcasting (no (n, k) gather)
        Hv = (Hw / s[owner, None]).reshape(O, m, d)
        Qg = Q.reshape(G, m, k)
        codes = torch.empty(O, m, dtype=torch.long)
        rows = max(1, min(per_group, CHUNK // max(k * m, 1)))
        for g in range(G):
            for a in range(g * per_group, (g + 1) * per_group, rows):
                b = min(a + rows, (g + 1) * per_group)
                dist = (Hv[a:b] @ C.T).mul_(-2.0).add_(Qg[g])
                codes[a:b] = dist.min(-1).indices  # argmin's first minimum, in 60% of its time
        return codes.reshape(n)

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
            worst = _errors(wf, Hw, Hf, hidx, s[owner], C, codes).argsort(descending=True)[: int((~used).sum())]
            C_new[~used] = wf[worst] / s0[owner[worst], None]
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


def _unique_rows(v: torch.Tensor) -> torch.Tensor:
    """torch.unique(v, dim=0), the distinct rows of v (n, d) in ascending lexicographic order, in
    O(n) memory: one stable sort per column, from the last. torch's own keeps a tensor object per
    row (about 275 bytes a row: 7 GB for VGG's classifier, 25.7M sub-vectors of 4)."""
    n, d = v.shape
    order = torch.arange(n)
    for j in range(d - 1, -1, -1):
        order = order[torch.sort(v[order, j], stable=True).indices]
    rows = v[order]
    keep = torch.ones(n, dtype=torch.bool)
    keep[1:] = (rows[1:] != rows[:-1]).any(1)
    return rows[keep]


def _errors(wf: torch.Tensor, Hw: torch.Tensor, Hf: torch.Tensor, hidx: torch.Tensor, so: torch.Tensor,
            C: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Each sub-vector's error (w - s c)^T (H w - s H c) under its block (n,), by chunks of sub-vectors:
    no (n, d, d) gather of the blocks (1.6 GB for VGG's classifier)."""
    out = torch.empty(wf.shape[0])
    step = max(1, CHUNK // wf.shape[1] ** 2)
    for a in range(0, wf.shape[0], step):
        c, sc = C[codes[a:a + step]], so[a:a + step, None]
        err = (wf[a:a + step] - sc * c) * (Hw[a:a + step] - sc * torch.einsum("nij,nj->ni", Hf[hidx[a:a + step]], c))
        out[a:a + step] = err.sum(1)
    return out


def assign_with_feedback(w: torch.Tensor, H: torch.Tensor | Spans, fit: PqFit, damp: float = 0.01,
                         factor: torch.Tensor | None = None, measure: bool = True) -> PqFit:
    """Codes re-assigned block by block (GPTQ order) for a fixed codebook: with U the upper
    Cholesky factor of H^-1, block b is assigned under the metric (U_bb^T U_bb)^-1 and its error E
    updates the later blocks, W_rest -= E U_bb^-1 U_b,rest. w: (C_out, m, d); H: (G, m*d, m*d)
    full input second moment per group (G must divide C_out); factor: U as `inverse_cholesky(H,
    damp)` gives it, when the caller has it already (one per layer, for every block size). Returns
    the fit with new codes and its error measured with the full H (the EM's `error` uses only the
    diagonal blocks; measure=False: NaN, for a caller that measures the error itself). Above
    WIDE_K inputs, or with H given as its Spans: `_feedback_spans` (factor is not used), its error
    measured with the diagonal blocks of H."""
    O, m, d = w.shape
    if isinstance(H, Spans) or H.shape[-1] > WIDE_K:
        spans = H if isinstance(H, Spans) else Spans.of(H, span_width(d))
        new = _feedback_spans(w, spans, fit, damp)
        return dataclasses.replace(new, error=weighted_error(w, spans.blocks_of(d).float(), new.weight()) if measure
                                   else float("nan"))
    G, FF, _ = H.shape
    C, s = fit.codewords, fit.scale if fit.scale is not None else torch.ones(O)
    W = w.reshape(G, O // G, FF).double().clone()
    U = inverse_cholesky(H, damp) if factor is None else factor  # (G, FF, FF)
    codes = torch.empty(G, O // G, m, dtype=torch.long)
    sg = s.reshape(G, O // G).double()
    Cd = C.double()
    for b in range(m):
        sl = slice(b * d, (b + 1) * d)
        Ubb = U[:, sl, sl]
        code, E = _assign_block(W[:, :, sl], Ubb, sg, Cd)
        codes[:, :, b] = code
        if b + 1 < m:
            W[:, :, (b + 1) * d:] -= E @ torch.linalg.solve(Ubb, U[:, sl, (b + 1) * d:])
    new = dataclasses.replace(fit, codes=codes.reshape(O, m))
    return dataclasses.replace(new, error=full_error(w, H, new.weight()) if measure else float("nan"))


def _assign_block(Wb: torch.Tensor, Ubb: torch.Tensor, sg: torch.Tensor, Cd: torch.Tensor):
    """One block of the sequential assignment: the codes (G, C_out/G) of the block's current
    sub-vectors Wb (G, C_out/G, d) under the metric (U_bb^T U_bb)^-1 (Ubb (G, d, d)), channel
    scales sg (G, C_out/G), codewords Cd (k, d); and their error Wb - scale * codeword."""
    Minv = torch.linalg.inv(Ubb.transpose(1, 2) @ Ubb)  # (G, d, d): metric of this block
    v = Wb / sg[..., None]  # (G, O/G, d)
    quad = torch.einsum("ki,gij,kj->gk", Cd, Minv, Cd)  # (G, k)
    cross = torch.einsum("goi,gij,kj->gok", v, Minv, Cd)
    code = (quad[:, None, :] - 2.0 * cross).argmin(-1)
    return code, Wb - sg[..., None] * Cd[code]


def _feedback_spans(w: torch.Tensor, H: Spans, fit: PqFit, damp: float, lazy: int = 128) -> PqFit:
    """assign_with_feedback for a wide layer (m*d > WIDE_K): the blocks are taken in H's spans
    (span_width(d): WIDE_K // d blocks), each with the factor of its own diagonal block of H alone (a block's error
    goes to the later blocks of its span only), and, as GPTQ does, the errors E U_bb^-1 of about
    `lazy` columns are pushed to the rest of the span in one product. O(C_out K WIDE_K) time and
    WIDE_K^2 float64 factors instead of C_out K^2 in rank-d updates, K^3 and several K x K; with
    one span (and no rounding) it assigns as the whole-matrix route does. Returns the fit with the
    new codes, error unmeasured (NaN)."""
    O, m, d = w.shape
    G, FF = H.groups, H.size
    if FF != m * d or H.span % d:
        raise ValueError(f"spans of {H.span} over {FF} inputs do not fit sub-vectors {tuple(w.shape)}")
    C, s = fit.codewords, fit.scale if fit.scale is not None else torch.ones(O)
    codes = torch.empty(G, O // G, m, dtype=torch.long)
    sg = s.reshape(G, O // G).double()
    Cd = C.double()
    per, step = H.span // d, max(1, lazy // d)
    for b0, block in zip(range(0, m, per), H.blocks):
        b1 = min(b0 + per, m)
        U = inverse_cholesky(block, damp)  # (G, span, span), span columns from 0
        # the span's own columns in float64: no error leaves the span (268 MB, not 822, at VGG's classifier)
        W = w.reshape(G, O // G, FF)[:, :, b0 * d:b1 * d].double().clone()
        for a0 in range(b0, b1, step):
            a1 = min(a0 + step, b1)
            F = torch.empty(G, O // G, (a1 - a0) * d, dtype=torch.float64)  # E U_bb^-1 of these blocks
            for b in range(a0, a1):
                sl = slice((b - b0) * d, (b - b0 + 1) * d)
                Ubb = U[:, sl, sl]
                code, E = _assign_block(W[:, :, sl], Ubb, sg, Cd)
                codes[:, :, b] = code
                Fb = torch.linalg.solve_triangular(Ubb, E, upper=True, left=False)
                F[:, :, (b - a0) * d:(b - a0 + 1) * d] = Fb
                W[:, :, sl.stop:(a1 - b0) * d] -= Fb @ U[:, sl, sl.stop:(a1 - b0) * d]
            W[:, :, (a1 - b0) * d:] -= F @ U[:, (a0 - b0) * d:(a1 - b0) * d, (a1 - b0) * d:]
        del U, W
    return dataclasses.replace(fit, codes=codes.reshape(O, m), error=float("nan"))


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor (float64) of (H + damp * mean diag * I)^-1, per group (H (G, F, F)); the
    damping grows tenfold (at most three times) while rounding leaves the inverse not numerically
    positive definite."""
    # (H + H^T) / 2 + damp * scale * I made in place, each attempt from H: two F x F float64 at a
    # time, not seven (512 MB each on a span of a wide layer)
    for attempt in range(4):
        damped = H.double().clone() if H.dtype == torch.float64 else H.double()
        damped += H.transpose(1, 2)
        damped /= 2
        scale = torch.diagonal(damped, dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        torch.diagonal(damped, dim1=1, dim2=2).add_((damp * scale)[:, None])
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if not bool(info.any()):
            inv = torch.cholesky_inverse(L)
            del L
            inv = inv + inv.transpose(1, 2)
            inv /= 2
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
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
    E[x_q x_q^T], H_qf = E[x_q x_f^T]: (G, F, F), G groups dividing C_out. Returns (C_out, F).
    Above WIDE_K inputs: `float_target_spans`."""
    O, FF = w.shape
    G = H_qq.shape[0]
    if H_qq.shape != (G, FF, FF) or H_qf.shape != H_qq.shape or O % G:
        raise ValueError(f"H_qq {tuple(H_qq.shape)} / H_qf {tuple(H_qf.shape)} do not fit a weight {tuple(w.shape)}")
    # the layer's mean energy, not each group's: a depthwise channel whose input is dead on the calibration
    # images must keep its float weight, not get an arbitrary one (EfficientNet-Lite0 _blocks.8 with a
    # per-group ridge: relative weight MSE 27 at the same output error)
    if FF > WIDE_K:
        return float_target_spans(w, Spans.of(H_qq, WIDE_K), _residual(w, H_qq, H_qf), damping)
    lam = max(damping, 1e-6) * float(torch.diagonal(H_qq, dim1=1, dim2=2).double().mean().clamp_min(1e-30))
    Hq, Hx = H_qq.double(), H_qf.double()
    Wt = w.reshape(G, O // G, FF).transpose(1, 2).double()  # (G, F, O/G)
    A = (Hq + Hq.transpose(1, 2)) / 2 + lam * torch.eye(FF, dtype=torch.float64)
    target = torch.linalg.solve(A, Hx @ Wt + lam * Wt)
    return target.transpose(1, 2).reshape(O, FF).to(w.dtype)


def _residual(w: torch.Tensor, H_qq: torch.Tensor, H_qf: torch.Tensor) -> torch.Tensor:
    """(H_qf - H_qq) W^T per group, (G, F, C_out/G) float32, a few rows of H at a time (no F x F difference)."""
    G, FF = H_qq.shape[0], H_qq.shape[-1]
    Wg = w.reshape(G, -1, FF).float()
    rows = max(1, CHUNK // FF)
    return torch.stack([torch.cat([(H_qf[g, a:a + rows].float() - H_qq[g, a:a + rows].float()) @ Wg[g].T
                                   for a in range(0, FF, rows)]) for g in range(G)])


def float_target_spans(w: torch.Tensor, H_qq: Spans, residual: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """float_target for a wide layer (F > WIDE_K), written as W* = W + (H_qq + lam I)^-1 (H_qf - H_qq) W
    (the float weight corrected by the mismatch of the two networks' inputs) with the inverse taken
    span by span, each span's diagonal block of H_qq alone: the correction is the exact one when
    the spans' inputs are uncorrelated, and W* = W when x_q = x_f. residual: (H_qf - H_qq) W^T per
    group, (G, F, C_out/G) (statistics.span_stats sums it without either F x F moment); lam as in
    `float_target`. The solves are float64 on a span x span, instead of a float64 F x F solve (F^3)
    and several float64 F x F copies."""
    O, FF = w.shape
    G = H_qq.groups
    if H_qq.size != FF or residual.shape != (G, FF, O // G) or O % G:
        raise ValueError(f"spans of {H_qq.size} inputs / residual {tuple(residual.shape)} do not fit a weight "
                         f"{tuple(w.shape)}")
    lam = max(damping, 1e-6) * float(H_qq.diagonal().double().mean().clamp_min(1e-30))
    Wg = w.reshape(G, O // G, FF).float()
    out = Wg.clone()
    for g in range(G):
        a = 0
        for block in H_qq.blocks:
            s = slice(a, a + block.shape[-1])
            a = s.stop
            A = block[g].to(torch.float64, copy=True)
            A += block[g].T  # symmetrized without a second float64 copy
            A.mul_(0.5).diagonal().add_(lam)
            out[g, :, s] += torch.linalg.solve(A, residual[g, s].double()).T.float()
    return out.reshape(O, FF).to(w.dtype)


def float_output_error(w: torch.Tensor, w_hat: torch.Tensor, S: dict) -> float:
    """||X_f w - X_q w^||^2 / ||X_f w||^2 from the joint statistics of `joint_stats` (w, w^: (C_out, F))."""
    G, FF, _ = S["qq"].shape
    Wf = w.reshape(G, -1, FF).double()
    Wq = w_hat.reshape(G, -1, FF).double()
    ff = torch.einsum("goi,gij,goj->", Wf, S["ff"].double(), Wf)
    num = ff - 2 * torch.einsum("goi,gij,goj->", Wq, S["qf"].double(), Wf) + torch.einsum(
        "goi,gij,goj->", Wq, S["qq"].double(), Wq)
    return float(num / ff.clamp_min(1e-30))
