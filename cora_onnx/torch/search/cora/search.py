"""`search_cora` and its optimization phases: the student, the distillation objective, the rank
search on the Butterworth cutoffs, the projection to integer ranks under the budget, fine-tuning."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.core.errors import DataError
from cora_onnx.core.progress import Phases
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.core.plan import Plan
from cora_onnx.torch.images import as_torch
from cora_onnx.torch.search.layers import select_layers, skeleton_layer
from cora_onnx.torch.search.distill import Capture, augment_batch, distill_loss, feature_loss
from cora_onnx.torch.search.cora.layer import SearchLayer, set_module
from cora_onnx.torch.search.cora.grids import (_correct_statistics, _float_statistics, _quantize_layers, _quantize_mixed,
                                               _reset_biases, adaptable, mixable)
from cora_onnx.torch.search.cora.result import _build_plan
from cora_onnx.torch.search.cora.settings import CoraSettings

log = logging.getLogger(__name__)


def _project_ranks(c: dict[str, float], full: dict[str, int], per_rank: dict[str, int], allowed: float) -> dict[str, int]:
    """ceil(c R) per layer, scaled down uniformly (bisection on a factor) until it fits the budget."""
    def ranks(f):
        return {n: (max(1, math.ceil(min(1.0, f * c[n]) * full[n])) if f * c[n] * full[n] >= 0.5 else 0) for n in c}

    def cost(r):
        return sum(r[n] * per_rank[n] for n in r)

    if cost(ranks(1.0)) <= allowed:
        return ranks(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks(mid)) <= allowed else (lo, mid)
    return ranks(lo)


@dataclass
class _Search:
    """The state the phases of search_cora pass along."""

    settings: CoraSettings
    teacher: nn.Module
    layers: dict[str, nn.Module]
    bits: dict[str, int]
    adapted: list[str]
    calib: object
    total_params: int
    student: nn.Module | None = None
    wrapped: dict[str, SearchLayer] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    per_rank: dict[str, int] = field(default_factory=dict)
    weight_frac: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    c_final: dict[str, float] = field(default_factory=dict)
    history: list = field(default_factory=list)
    objective: object = None
    mixed: dict | None = None
    phases: Phases = field(default_factory=Phases)
    known_logits: tuple | None = None  # (calibration indices, the float network's logits of those images)


def _build_student(st: _Search, grids: dict, factors: dict) -> None:
    """The student: every planned layer a SearchLayer (grid + Butterworth-weighted residual), cutoffs
    started where the budget is met with equal fractions."""
    st.student = copy.deepcopy(st.teacher)
    for name in st.bits:
        f = factors[name]
        if f is not None:
            st.full[name] = f[1].shape[0]
            st.per_rank[name] = f[1].shape[1] + f[0].shape[0]
            st.weight_frac[name] = st.full[name] * st.per_rank[name] / st.total_params
        st.wrapped[name] = SearchLayer(st.layers[name], grids[name].dequantize().to(torch.float32), f, st.settings.order, 1.0)
    if st.adapted:
        start = min(1.0, st.settings.budget / max(sum(st.weight_frac.values()), 1e-12))
        for n in st.adapted:
            st.wrapped[n].c.data.fill_(max(start, 1.0 / st.full[n]))
    for name, w in st.wrapped.items():
        set_module(st.student, name, w)
    st.student.eval()


@torch.no_grad()
def _teacher_logits(st: _Search, used: torch.Tensor, bs: int = 64) -> torch.Tensor | None:
    """The float network's logits of the calibration images `used`: those of the statistics images
    from the statistics pass (st.known_logits), the others computed here."""
    calib, teacher = st.calib, st.teacher
    if not len(used):
        return None
    out = None
    have = torch.zeros(len(used), dtype=torch.bool)
    if st.known_logits is not None:
        idx, known = st.known_logits
        pos = torch.full((len(calib),), -1, dtype=torch.long)
        pos[idx] = torch.arange(len(idx))
        have = pos[used] >= 0
        out = torch.empty(len(used), known.shape[1], dtype=known.dtype)
        out[have] = known[pos[used[have]]]
    todo = used[~have]
    with st.phases("teacher logits", -(-len(todo) // bs), "batches",
                   f"CoRa: float logits of {len(todo)} more calibration images the steps draw "
                   f"({int(have.sum())} from the statistics pass)") as p:
        parts = [teacher(calib.preprocess.normalize(calib.images[todo[a:a + bs]])
                         .contiguous(memory_format=torch.channels_last)) for a in p.wrap(range(0, len(todo), bs))]
    if out is None:
        return torch.cat(parts)
    if parts:
        out[~have] = torch.cat(parts).to(out.dtype)
    return out


def _make_objective(st: _Search, captures: list) -> None:
    """st.objective(): one batch's distillation loss of the student against the float network.
    Without augmentation or feature matching the batches are drawn up front (the same draws as
    one by one) and the teacher's logits computed once, for the images drawn only; otherwise per step."""
    s, calib, teacher = st.settings, st.calib, st.teacher
    per_step = s.augment != "none" or s.features != "none"
    gen = torch.Generator().manual_seed(s.seed)
    feature_names = dict(st.wrapped) if s.features == "layers" else {}
    t_capture = Capture({n: st.layers[n] for n in feature_names})
    s_capture = Capture(feature_names)
    captures += [t_capture, s_capture]
    draws: list[torch.Tensor] = []
    if not per_step:
        draws = [torch.randint(len(calib), (s.search_batch,), generator=gen) for _ in range(int(s.iters))]
        used = torch.unique(torch.cat(draws)) if draws else torch.zeros(0, dtype=torch.long)
        row = torch.full((len(calib),), -1, dtype=torch.long)
        row[used] = torch.arange(len(used))
        teacher_logits = _teacher_logits(st, used)
    draws.reverse()

    def objective() -> torch.Tensor:
        idx = draws.pop() if draws else torch.randint(len(calib), (s.search_batch,), generator=gen)
        x = calib.preprocess.normalize(calib.images[idx])
        if per_step:
            x = augment_batch(x, s.augment, gen)
        x = x.contiguous(memory_format=torch.channels_last)  # CPU convolutions: fwd + bwd ~7% faster (ResNet-18)
        if per_step:
            with torch.no_grad():
                t = teacher(x)
            t_feats = t_capture.take()
        else:
            t, t_feats = teacher_logits[row[idx]], {}
        loss = distill_loss(st.student(x), t, s.distill)
        s_feats = s_capture.take()
        if t_feats:
            loss = loss + s.feature_weight * feature_loss(s_feats, t_feats)
        return loss

    st.objective = objective


def _search_ranks(st: _Search) -> None:
    """Rank search: only the Butterworth cutoffs are trained, distillation + budget penalty."""
    s, adapted = st.settings, st.adapted
    if not adapted or s.search_iters <= 0:
        return
    cs = [st.wrapped[n].c for n in adapted]
    fracs = torch.tensor([st.weight_frac[n] for n in adapted])
    opt = torch.optim.Adam(cs, lr=s.lr)
    lo = torch.tensor([1.0 / st.full[n] for n in adapted])
    log.info("rank search: %d steps of %d images, budget %.3f of %d weight parameters",
             s.search_iters, s.search_batch, s.budget, st.total_params)
    with st.phases("rank search", s.search_iters, "steps", "CoRa: rank search") as p:
        for it in p.wrap(range(s.search_iters)):
            _rank_step(st, it, cs, fracs, opt, lo)


def _rank_step(st: _Search, it: int, cs: list, fracs: torch.Tensor, opt, lo: torch.Tensor) -> None:
    """One step of the rank search."""
    s, adapted = st.settings, st.adapted
    used = (torch.stack(cs) * fracs).sum()
    kd = st.objective()
    loss = kd + s.gamma * torch.exp(F.relu(used - s.budget))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_value_(cs, 1.0)
    opt.step()
    with torch.no_grad():
        c_new = torch.minimum(torch.maximum(torch.stack(cs), lo), torch.ones_like(lo))
        for p, v in zip(cs, c_new):
            p.fill_(v)
    st.history.append((float(kd.detach()), float(used.detach())))
    if it % 25 == 0 or it == s.search_iters - 1:
        ranks_now = [math.ceil(float(p.detach()) * st.full[n]) for p, n in zip(cs, adapted)]
        log.info("search %d/%d: distillation loss %.4f, budget used %.4f/%.4f, ranks %d-%d (median %d)",
                 it + 1, s.search_iters, float(kd.detach()), float(used.detach()), s.budget,
                 min(ranks_now), max(ranks_now), int(np.median(ranks_now)))


def _fix_ranks(st: _Search) -> list[str]:
    """Project the cutoffs to integer ranks under the budget; returns the layers left with an adapter."""
    st.c_final = {n: float(st.wrapped[n].c.detach()) for n in st.adapted}
    allowed = st.settings.budget * st.total_params
    st.ranks = _project_ranks(st.c_final, st.full, st.per_rank, allowed) if st.adapted else {}
    for n in st.adapted:
        if st.ranks[n] > 0:
            st.wrapped[n].set_hard(st.ranks[n])
        else:
            st.wrapped[n].mode = "none"
    return [n for n in st.adapted if st.ranks.get(n, 0) > 0]


def _finetune(st: _Search, live: list[str], fixed: frozenset) -> None:
    """Fine-tune the adapter factors (and the biases unless finetune_biases is False) by distillation."""
    s = st.settings
    if s.finetune_iters <= 0 or not live:
        return
    params = []
    for n in live:
        for p in (st.wrapped[n].a, st.wrapped[n].b):
            params.append({"params": [p], "lr": 1e-3 * float(p.detach().pow(2).mean().sqrt()) + 1e-12})
    biases = gains = 0
    for name, w in st.wrapped.items():
        if name in fixed:
            continue
        if s.finetune_biases:
            w.bias.requires_grad_(True)
            params.append({"params": [w.bias], "lr": 1e-3 * float(w.bias.detach().pow(2).mean().sqrt()) + 1e-6})
            biases += 1
        if s.finetune_gains:  # a buffer, absorbed into the grid's scales by _build_plan
            w.gain.requires_grad_(True)
            params.append({"params": [w.gain], "lr": 5e-4})
            gains += 1
    opt = torch.optim.Adam(params)
    log.info("fine-tuning %d adapters, %d biases and %d gain vectors: %d steps", len(live), biases, gains,
             s.finetune_iters)
    used = float(sum(st.ranks[n] * st.per_rank[n] for n in live) / st.total_params)
    with st.phases("fine-tuning", s.finetune_iters, "steps", "CoRa: fine-tuning") as p:
        for it in p.wrap(range(s.finetune_iters)):
            _finetune_step(st, it, opt, used)


def _finetune_step(st: _Search, it: int, opt, used: float) -> None:
    """One fine-tuning step."""
    s = st.settings
    kd = st.objective()
    opt.zero_grad()
    kd.backward()
    opt.step()
    st.history.append((float(kd.detach()), used))
    if it % 25 == 0 or it == s.finetune_iters - 1:
        log.info("fine-tune %d/%d: distillation loss %.4f", it + 1, s.finetune_iters, float(kd.detach()))


def search_cora(model: nn.Module, settings: CoraSettings, calib) -> Plan:
    """Quantize every selected layer, search adapter ranks under the budget, fine-tune, and plan:
    statistics and quantization (_quantize_layers), the student (_build_student), rank search
    (_search_ranks), rank projection (_fix_ranks), fine-tuning (_finetune), the plan (_build_plan)."""
    if calib is None or len(calib) == 0:
        raise DataError("CoRa needs calibration images")
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = quantizable_layers(teacher)
    bits = select_layers(layers, settings.bits, settings.selection)
    adapted = adaptable(layers, bits, settings) if settings.bits < 8 else []
    calib = as_torch(calib).subset(settings.calib_size, settings.seed)
    # channels-last batches: PyTorch's CPU convolutions run them faster (ResNet-18 ~10%, MobileNetV2 ~2x)
    stats_batches = [x.contiguous(memory_format=torch.channels_last)
                     for x in calib.subset(settings.stats_size, settings.seed + 1).batches(32)]
    log.info("CoRa: %d layers; statistics on %d images", len(bits), sum(len(b) for b in stats_batches))
    t0 = time.perf_counter()
    phases = Phases()
    float_stats = {}
    if settings.stats != "none":
        with phases("output statistics", len(stats_batches), "batches", "CoRa: float output statistics") as p:
            float_stats = _float_statistics(teacher, layers, p.wrap(stats_batches))
    mixed = None
    # the steps' teacher logits of the statistics images come from the statistics pass
    logits: list | None = [] if settings.iters > 0 and settings.augment == "none" and settings.features == "none" \
        else None
    if settings.mixed_bits and settings.bits < 8 and mixable(layers, bits, settings.bits):  # per-layer widths
        grids, factors, bits, mixed = _quantize_mixed(teacher, layers, bits, settings, stats_batches, phases, logits)
        adapted = [n for n in bits if factors[n] is not None]
    else:
        grids, factors = _quantize_layers(teacher, layers, bits, adapted, settings, stats_batches, phases, logits)
    known = (torch.from_numpy(calib.subset_indices(settings.stats_size, settings.seed + 1)), torch.cat(logits)) \
        if logits else None
    st = _Search(settings, teacher, layers, bits, adapted, calib, sum(m.weight.numel() for m in layers.values()),
                 mixed=mixed, phases=phases, known_logits=known)
    log.info("statistics, quantization (%s rounding) and residual decomposition (%s): %.1f s; %d layers with "
             "adapters", settings.rounding, settings.svd, time.perf_counter() - t0, len(adapted))
    _build_student(st, grids, factors)
    captures: list = []
    if adapted and settings.iters > 0:  # some step will train: the distillation objective
        _make_objective(st, captures)
    # Linear layers (the classifier): per-class corrections, left alone unless fit_classifier
    fixed = frozenset() if settings.fit_classifier else \
        frozenset(n for n in st.wrapped if isinstance(layers[n], nn.Linear))
    stats_batch = torch.cat(stats_batches[:4]) if settings.stats != "none" else None
    if settings.stats != "none":
        _correct_statistics(st.student, st.wrapped, float_stats, stats_batch, settings.stats, fixed)
    try:
        _search_ranks(st)
        live = _fix_ranks(st)
        if settings.stats != "none":
            with torch.no_grad():  # re-estimate from the gain/bias state before the soft correction
                for w in st.wrapped.values():
                    w.gain.fill_(1.0)
            _reset_biases(st.wrapped, layers)
            _correct_statistics(st.student, st.wrapped, float_stats, stats_batch, settings.stats, fixed)
        _finetune(st, live, fixed)
    finally:
        for c in captures:
            c.remove()
    return _build_plan(st, grids, live, time.perf_counter() - t_start)


def rehearsal_cora(model: nn.Module, settings: CoraSettings) -> tuple[Plan, ...]:
    """What search_cora may write, zero-filled (skeleton_layer), one plan per width the layers at
    `bits` may take (mixed_bits, else `bits` alone; the kept layers at their keep_bits in each):
    the grids of settings.spec, an adapter (rank 1, adapter_bits) on every adaptable layer below 8
    bits (with one or without: the export also writes the plan without them) and the float32 bias
    on every layer whose bias the search may change."""
    layers = quantizable_layers(model)
    bits = select_layers(layers, settings.bits, settings.selection)
    moved = set(mixable(layers, bits, settings.bits)) if settings.mixed_bits and settings.bits < 8 else set()
    adapters = set(adaptable(layers, bits, settings))
    # the statistics correction changes the biases; the fine-tuning does when it runs (adapters to tune)
    trained = settings.stats != "none" or (settings.finetune_biases and settings.finetune_iters > 0 and bool(adapters)
                                           and settings.bits < 8)

    def layer(n: str, b: int):
        fixed = isinstance(layers[n], nn.Linear) and not settings.fit_classifier
        changed = layers[n].bias is None or (trained and not fixed)
        return skeleton_layer(n, layers[n], settings.spec(b),
                              adapter_bits=settings.adapter_bits if n in adapters and b < 8 else None,
                              bias="float32" if changed else None)

    widths = sorted(settings.mixed_bits) if moved else [settings.bits]
    return tuple(Plan("cora", {}, tuple(layer(n, w if n in moved else b) for n, b in bits.items())) for w in widths)
