"""Search phases 1-2: the float network's output statistics, each layer's grid (GPTQ on the input
statistics) and residual decomposition, and the output-statistics correction."""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
from torch import nn

from cora_onnx.core.progress import Phases
from cora_onnx.torch.quantizers import (QuantSpec, QuantizedTensor, gptq_round, gptq_round_many, group_clips,
                                        input_weighted_clip, output_error, quantizable_layers, quantize_weight)
from cora_onnx.torch.search.harm import layer_harm
from cora_onnx.torch.search.stats import input_second_moments, input_width
from cora_onnx.torch.search.cora.layer import SearchLayer
from cora_onnx.torch.search.cora.mixed import choose_bits, layer_cost
from cora_onnx.torch.search.cora.settings import CoraSettings

log = logging.getLogger(__name__)


@torch.no_grad()
def _float_statistics(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor]) -> dict:
    """Per-channel output mean and std of every layer of the float network (for --stats)."""
    sums: dict[str, list] = {}

    def hook(name):
        def fn(mod, inputs, out):
            o = out.transpose(0, 1).reshape(out.shape[1], -1) if out.dim() == 4 else out.T
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + o.sum(1).double()
            s[1] = s[1] + (o * o).sum(1).double()
            s[2] += o.shape[1]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for n, (s1, s2, cnt) in sums.items():
        mean = s1 / cnt
        stats[n] = (mean.float(), (s2 / cnt - mean ** 2).clamp_min(0).sqrt().float())
    return stats


@torch.no_grad()
def _execution_order(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    """Layer names in the order a forward pass runs them (one image)."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n) if n not in order else None)
               for n, m in layers.items()]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in layers if n not in order]


def _quantize_layers(teacher: nn.Module, layers: dict[str, nn.Module], bits: dict[str, int], adapted: list[str],
                     settings: "CoraSettings", batches: list[torch.Tensor], phases: Phases,
                     logits: list | None = None) -> tuple[dict, dict]:
    """Phase 1-2: input statistics and each layer's grid (GPTQ when settings.rounding == "gptq") and
    residual factors (for the adapted layers). With gptq_passes > 1 the layers are taken by depth in
    that many groups, each group's statistics from a copy of the network whose earlier groups are
    already quantized. logits: when a list, the float network's logits of the batches are appended
    to it when a statistics pass runs on the float network (the pass then runs to the end).
    Returns ({name: QuantizedTensor}, {name: (U S, V) or None})."""
    ungrouped = [n for n in bits if not (isinstance(layers[n], nn.Conv2d) and layers[n].groups != 1)]
    need_cov = set(ungrouped) if settings.rounding == "gptq" or settings.clip_metric == "input" else set()
    if settings.svd == "activation":
        need_cov |= set(adapted)
    order = [n for n in _execution_order(teacher, layers, batches[0]) if n in bits]
    passes = max(1, min(settings.gptq_passes, len(need_cov)))
    work = copy.deepcopy(teacher) if passes > 1 else teacher
    work_layers = quantizable_layers(work)
    grids, factors = {}, {}

    def quantize(name: str, cov: torch.Tensor | None) -> None:
        qt, f = _quantize_layer(layers[name].weight.detach(), settings.spec(bits[name]), settings, cov,
                                name in adapted)
        grids[name], factors[name] = qt, f
        if work is not teacher:
            work_layers[name].weight.data = qt.dequantize().to(torch.float32).reshape(layers[name].weight.shape)

    with phases("grids", len(order) - len(need_cov), "layers", "CoRa: grids of the layers without statistics") as p:
        for name in order:
            if name not in need_cov:
                quantize(name, None)
                p.advance()
    cov_order = [n for n in order if n in need_cov]
    groups = [list(g) for g in np.array_split(np.array(cov_order, dtype=object), passes) if len(g)]
    for gi, group in enumerate(groups):
        rows = {n: math.ceil(settings.cov_rows * input_width(layers[n])) for n in group}
        of = f" (group {gi + 1}/{len(groups)})" if len(groups) > 1 else ""
        with phases("statistics", len(batches), "batches", f"CoRa: input statistics of {len(group)} layers{of}") as p:
            acc = input_second_moments(work, {n: work_layers[n] for n in group}, batches, rows,
                                       seed=settings.seed + gi, progress=p,
                                       outputs=logits if gi == 0 and work is teacher else None)
        with phases("grids", len(group), "layers", f"CoRa: grids and residuals{of}") as p:
            for n in group:
                quantize(n, acc.pop(n).take())
                p.advance()
    return grids, factors


@torch.no_grad()
def _correct_statistics(student: nn.Module, wrapped: dict[str, SearchLayer], target: dict, batch: torch.Tensor,
                        mode: str, skip: frozenset = frozenset()) -> None:
    """One forward pass in layer order; each layer's output is corrected (and the correction absorbed
    into its gain and bias) before the next layer sees it."""

    def hook(name):
        def fn(mod: SearchLayer, inputs, out):
            o = out.transpose(0, 1).reshape(out.shape[1], -1) if out.dim() == 4 else out.T
            mu_q, sd_q = o.mean(1), o.std(1, unbiased=False)
            mu_f, sd_f = target[name]
            a = (sd_f / sd_q.clamp_min(1e-12)).clamp(0.5, 2.0) if mode == "float" else torch.ones_like(mu_q)
            a = torch.where(sd_q > 1e-8, a, torch.ones_like(a))
            mod.gain.mul_(a)
            mod.bias.data = a * (mod.bias.data - mu_q) + mu_f
            view = (1, -1, 1, 1) if out.dim() == 4 else (1, -1)
            return a.view(view) * (out - mu_q.view(view)) + mu_f.view(view)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in wrapped.items() if n not in skip]
    try:
        student(batch)
    finally:
        for h in handles:
            h.remove()


def _quantize_layer(w: torch.Tensor, spec: QuantSpec, settings: "CoraSettings", cov: torch.Tensor | None,
                    decompose: bool) -> tuple[QuantizedTensor, tuple | None]:
    """The layer's grid (`_grid`) and, when decompose, the residual's factors (`_decompose`)."""
    qt = _grid(w, spec, settings, cov)
    return qt, (_decompose(w, qt, settings, cov) if decompose else None)


def _grid(w: torch.Tensor, spec: QuantSpec, settings: "CoraSettings", cov: torch.Tensor | None) -> QuantizedTensor:
    """The layer's grid: range from the input-weighted error when clip_metric == "input", GPTQ
    rounding when rounding == "gptq" (both need the input second moment cov)."""
    if settings.clip_metric == "input" and cov is not None:
        qt = input_weighted_clip(w, spec, cov)
    else:
        qt = quantize_weight(w, spec)
    if settings.rounding == "gptq" and cov is not None:
        qt = gptq_round(w, qt, cov, damp=settings.gptq_damp, act_order=settings.act_order)
    return qt


def _grids(w: torch.Tensor, specs: list[QuantSpec], settings: "CoraSettings",
           cov: torch.Tensor | None) -> list[QuantizedTensor]:
    """`_grid` at several widths in one pass: the output-error clip of group-wise grids and the GPTQ
    rounding take the rows of every width together (one inverse Hessian, one column loop)."""
    if settings.clip_metric == "input" and cov is not None:
        if len(specs) > 1 and len({sp.group for sp in specs}) == 1 and specs[0].group:
            qts = group_clips(w, specs, cov)
        else:
            qts = [input_weighted_clip(w, sp, cov) for sp in specs]
    else:
        qts = [quantize_weight(w, sp) for sp in specs]
    if settings.rounding == "gptq" and cov is not None:
        qts = gptq_round_many(w, qts, cov, damp=settings.gptq_damp, act_order=settings.act_order)
    return qts


def _decompose(w: torch.Tensor, qt: QuantizedTensor, settings: "CoraSettings", cov: torch.Tensor | None) -> tuple:
    """The residual's factors (U S, V) with R = U S V, decomposed in the metric of the inputs when
    svd == "activation"."""
    r = (w - qt.dequantize().to(torch.float32)).reshape(w.shape[0], -1)
    if settings.svd == "activation":
        h = cov.double()
        h = h + torch.eye(h.shape[0], dtype=h.dtype) * (0.01 * torch.diag(h).mean() + 1e-12)
        if r.shape[0] <= r.shape[1]:  # C <= K: from the C x C matrix R H R^T, no K x K factorization
            return _decompose_rows(r.double(), h)
        chol = torch.linalg.cholesky(h)  # H = C C^T
        u, s, vt = torch.linalg.svd(r.double() @ chol, full_matrices=False)
        v = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # V^T C^-1
    else:
        u, s, v = torch.linalg.svd(r.double(), full_matrices=False)
    return (u * s).float(), v.float()


def _decompose_rows(r: torch.Tensor, h: torch.Tensor) -> tuple:
    """The SVD of R C (C C^T = H) from the eigenvectors of R H R^T = U S^2 U^T (C x C, C <= K):
    U S as before, and V^T C^-1 = S^-1 U^T R, since R C = U S V^T. The same factors as the SVD
    route (up to each pair's sign) without the K x K Cholesky factor and triangular solve; the
    directions of negligible energy (S below 1e-12 of the largest) get zero factors."""
    m = r @ h @ r.T
    lam, u = torch.linalg.eigh((m + m.T) / 2)
    lam, u = lam.flip(0), u.flip(1)  # descending
    s = lam.clamp_min(0).sqrt()
    live = s > 1e-12 * s[0].clamp_min(1e-300)
    inv = torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))
    v = (u * inv).T @ r
    return (u * s).float(), v.float()


def mixable(layers: dict[str, nn.Module], bits: dict[str, int], b0: int) -> list[str]:
    """The layers --mixed-bits may move: planned at b0 (not kept), not grouped convolutions."""
    return [n for n, b in bits.items() if b == b0 and not (isinstance(layers[n], nn.Conv2d) and layers[n].groups != 1)]


def adaptable(layers: dict[str, nn.Module], bits: dict[str, int], settings: "CoraSettings") -> list[str]:
    """The layers that get an adapter when their grid is below 8 bits: the mixable convolutions,
    with an adapter budget."""
    return [n for n in mixable(layers, bits, settings.bits) if isinstance(layers[n], nn.Conv2d) and settings.budget > 0]


def _quantize_mixed(teacher: nn.Module, layers: dict[str, nn.Module], bits: dict[str, int],
                    settings: "CoraSettings", batches: list[torch.Tensor], phases: Phases,
                    logits: list | None = None) -> tuple[dict, dict, dict, dict]:
    """Phase 1-2 with per-layer widths (settings.mixed_bits, cora_onnx.torch.search.cora.mixed): every
    candidate layer (those planned at settings.bits, not grouped) gets a grid at every allowed width;
    the widths are chosen under the bytes of uniform settings.bits (or settings.mixed_budget bits per
    weight) by measured sensitivity (cora_onnx.torch.search.harm, from cached stage inputs); then
    the residuals of the convolutions below 8 bits are decomposed (when settings.budget > 0: their
    adapters' rank search follows). Returns (grids, factors (None where no adapter), bits with the
    chosen widths, the report's `mixed` section). logits: as in _quantize_layers."""
    b0 = settings.bits
    candidates = mixable(layers, bits, b0)
    widths = sorted(settings.mixed_bits)
    t0 = time.perf_counter()
    rows = {n: math.ceil(settings.cov_rows * input_width(layers[n])) for n in candidates}
    with phases("statistics", len(batches), "batches",
                f"CoRa: input statistics of {len(candidates)} layers on {sum(len(x) for x in batches)} images") as p:
        acc = input_second_moments(teacher, {n: layers[n] for n in candidates}, batches, rows, seed=settings.seed,
                                   progress=p, outputs=logits)
    covs = {n: acc.pop(n).take() for n in candidates}
    grids, factors, by_width = {}, {}, {}
    low = [b for b in widths if b < 8]
    effort = {n: float(layers[n].weight.numel()) * (input_width(layers[n]) if n in covs else 1) for n in bits}
    with phases("grids", len(bits), "layers", f"CoRa: grids at {','.join(map(str, widths))} bits",
                work=sum(effort.values())) as p:
        for n in bits:
            if n not in covs:  # kept or grouped layers: as in the uniform search (no statistics)
                grids[n], factors[n] = _quantize_layer(layers[n].weight.detach(), settings.spec(bits[n]), settings,
                                                       None, False)
            else:
                w = layers[n].weight.detach()
                by_width[n] = dict(zip(low, _grids(w, [settings.spec(b) for b in low], settings, covs[n])))
                if 8 in widths:  # as the kept layers get it (the weight-error grid, nearest rounding): GPTQ buys nothing
                    by_width[n][8] = _grid(w, settings.spec(8), settings, None)
            p.advance(work=effort[n])
    images = torch.cat(batches)[:settings.sens_images]
    measured = [b for b in settings.mixed_bits if b < 8]
    with phases("sensitivity", len(candidates), "layers",
                f"CoRa: harm of each layer alone at {','.join(map(str, measured))} bits on {len(images)} images") as p:
        harm = layer_harm(teacher, layers, {n: {b: by_width[n][b].dequantize().to(torch.float32) for b in measured}
                                            for n in candidates}, images, progress=p)
    for b in measured:
        alone = [harm[n][b] for n in candidates]
        log.info("  at %d bits: mean KL alone %.2g-%.2g", b, min(alone), max(alone))
    if 8 in settings.mixed_bits:  # next to nothing: carried from the widest measured width by the output error
        top = max(measured, default=None)
        for n in candidates:
            err = {b: output_error(layers[n].weight.detach(), by_width[n][b].dequantize().to(torch.float32), covs[n])
                   for b in (8, top) if b is not None}
            harm[n][8] = harm[n][top] * err[8] / err[top] if top is not None and err[top] > 0 else 0.0
    counts = {n: layers[n].weight.numel() for n in candidates}
    cost = {n: {b: layer_cost(counts[n], layers[n].weight.shape[0], b, settings.group_size) for b in widths}
            for n in candidates}
    if settings.mixed_budget is None:  # uniform b0, group scales included
        budget = sum(layer_cost(counts[n], layers[n].weight.shape[0], b0, settings.group_size) for n in candidates)
    else:
        budget = sum(counts.values()) * settings.mixed_budget
    per_weight = budget / sum(counts.values())
    chosen = choose_bits(harm, cost, budget)
    t3 = time.perf_counter()
    new_bits = dict(bits)
    adapt = [n for n in adaptable(layers, bits, settings) if chosen[n] < 8]
    with phases("decomposition", len(adapt), "layers", "CoRa: residual decompositions",
                work=sum(effort[n] for n in adapt)) as p:
        for n in candidates:
            new_bits[n] = chosen[n]
            grids[n] = by_width[n][chosen[n]]
            factors[n] = None
            if n in adapt:
                factors[n] = _decompose(layers[n].weight.detach(), grids[n], settings, covs[n])
                p.advance(work=effort[n])
    used = sum(cost[n][chosen[n]] for n in candidates)
    log.info("mixed bits: layers per width %s (%.3f of the budget)",
             {b: sum(1 for n in candidates if chosen[n] == b) for b in settings.mixed_bits}, used / budget)
    info = {"widths": list(settings.mixed_bits), "bits": {n: chosen[n] for n in candidates},
            "kl_alone": {n: {b: round(harm[n][b], 6) for b in settings.mixed_bits} for n in candidates},
            "budget_bits_per_weight": per_weight, "budget_bytes": budget / 8, "used_bytes": used / 8, "sensitivity_images": len(images),
            "seconds": t3 - t0}
    return grids, factors, new_bits, info


def _reset_biases(wrapped: dict[str, SearchLayer], layers: dict[str, nn.Module]) -> None:
    with torch.no_grad():
        for n, w in wrapped.items():
            b = layers[n].bias
            w.bias.data = b.detach().clone() if b is not None else torch.zeros_like(w.bias)
