"""`search_auto`: every layer's encoding chosen under one byte budget by measured harm, then fitted.

Phases (each logged with its seconds, progress at least every 20 s):

1. statistics: every layer's input covariance on the float network (`float_covariances`);
2. menu: every encoding of every layer fitted to the float weight under those statistics
   (`fit_encoding`), its relative output error e recorded; adapters' errors for every rank come
   from the singular values of the grid's residual in the metric of the inputs;
3. harm: harm = "kl": each layer's sensitivity is measured, the network's KL(float || quantized)
   on a few calibration images with only that layer on a reference encoding, its bias corrected
   as the fit corrects it (without the correction the harm of coarse encodings is overstated:
   EfficientNet-Lite0 at 10x through the CLI, 86.2% agreement against 91.2% with it); a layer's harm at
   error e follows the measured KL per unit of error (linear below the reference, a power law
   through a second, coarser reference above it); harm = "output": e itself;
4. choice: the least summed harm whose bytes (each encoding's bytes in the file, measured on the
   exported graph) fit the budget, exactly (`cora_onnx.core.budget.choose`);
5. fit: the chosen encodings fitted to the float weights under the float network's input
   statistics (as the menu, with em_iters EM iterations), biases corrected by the float input
   means, adapters from the residual in the metric of the inputs. refit instead fits them layer
   after layer to the float network's output on the partially quantized network (cached stage
   inputs, `staged.LayerFeed`; Linear layers to their own weight): closer on the calibration
   images, further from the float network on new classes once many layers are coarse
   (EfficientNet-Lite0 at 15x: 52.6% agreement against 64.2% on the 500-class protocol, before
   fine-tuning; docs/results/size-target.md), so it is not the default;
6. fine-tuning (settings.finetune_steps_for the choice's predicted harm: by default only when
   the choice is predicted to harm the network, AutoSettings): by distillation from the float network, the codewords and
   channel scales of codebooks (their codes stay, as in "And the bit goes down"), the scales of
   grids below 8 bits (their integers stay), the adapters and the biases.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cora_onnx.core.budget import choose
from cora_onnx.core.encoding import Encoding, encoding_summary, row_width
from cora_onnx.core.errors import DataError, ModelError, SettingsError
from cora_onnx.core.plan import Bias, Codebook, LayerPlan, LowRankAdapter, Plan
from cora_onnx.core.progress import progress
from cora_onnx.torch.images import as_torch
from cora_onnx.torch.quantizers import QuantSpec, quantizable_layers, quantize_weight
from cora_onnx.torch.search.auto.fit import Fit, adapter_factors, adapter_spectrum, fit_encoding, fit_menu, relative_error
from cora_onnx.torch.search.auto.measure import SensitivityProbe, float_covariances
from cora_onnx.torch.search.auto.menu import layer_facts, layer_menu
from cora_onnx.torch.search.auto.settings import FINETUNE_ABOVE, AutoSettings
from cora_onnx.torch.search.layers import select_layers, uniform_from
from cora_onnx.torch.search.pq.codebook import float_target
from cora_onnx.torch.search.pq.search import stats_sizes
from cora_onnx.torch.search.pq.statistics import Geom, input_stats, joint_stats
from cora_onnx.torch.search.staged import LayerFeed

__all__ = ["search_auto", "menus_of", "Measured", "measure_menu", "harm_table", "fit_choice", "finetune_choice",
           "plan_layers"]

log = logging.getLogger(__name__)


def menus_of(model: nn.Module, settings: AutoSettings) -> dict[str, list[Encoding]]:
    """Every planned layer's menu (the layers of the model not in selection.skip; a layer the
    selection keeps, e.g. --keep first, has its keep_bits grid alone)."""
    layers = quantizable_layers(model)
    kept = {n for n, b in select_layers(layers, 0, settings.selection).items() if b}
    return {n: [Encoding("uniform", bits=settings.selection.keep_bits)] if n in kept else layer_menu(m, settings)
            for n, m in layers.items() if n not in settings.selection.skip}


def _references(errors: dict[str, float], menu: list[Encoding]) -> list[str]:
    """The encodings whose KL is measured: the one of median error among those below 8 bits without
    adapter, then the coarsest (largest error) one when it is clearly coarser."""
    plain = sorted((errors[e.label], e.label) for e in menu if not e.rank and not (e.kind == "uniform" and e.bits >= 8)
                   and errors[e.label] > 0)
    if not plain:
        return []
    mid = plain[(len(plain) - 1) // 2]
    refs = [mid[1]]
    if plain[-1][0] > 2 * mid[0]:
        refs.append(plain[-1][1])
    return refs


def _harm_curve(points: list[tuple[float, float]]):
    """harm(e) through the measured (error, KL) points: linear in e up to the first, a power law
    (exponent 1 to 3) through the second above it."""
    (e1, k1) = points[0]
    slope = k1 / e1 if e1 > 0 else 0.0
    p = 1.0
    if len(points) > 1 and points[1][0] > e1 and points[1][1] > 0 and k1 > 0:
        p = float(np.clip(math.log(points[1][1] / k1) / math.log(points[1][0] / e1), 1.0, 3.0))

    def harm(e: float) -> float:
        if e <= e1 or p == 1.0:
            return slope * e
        return k1 * (e / e1) ** p
    return harm


@dataclass(frozen=True, eq=False)
class Measured:
    """Phases 1-3 of the search (module doc), what every choice is made from: the layers, their
    menus and statistics images, each layer's input covariance and mean on the float network, each
    encoding's relative output error, the fits of each layer's reference encodings, and per layer
    the measured (encoding, error, KL) references."""

    layers: dict
    menus: dict
    sizes: dict
    stats: dict
    errors: dict
    fits: dict
    sensitivity: dict
    seconds: dict


def measure_menu(model: nn.Module, settings: AutoSettings, calib) -> Measured:
    """Phases 1-3: statistics, every menu encoding's output error, each layer's sensitivity
    (harm "kl"); only the reference encodings' fits are kept (a weight per encoding otherwise)."""
    model = model.eval()
    layers = {n: m for n, m in quantizable_layers(model).items() if n not in settings.selection.skip}
    if not layers:
        raise ModelError("the model has no Conv2d/Linear layer to quantize")
    menus = menus_of(model, settings)
    images = as_torch(calib).subset(settings.calib_size, settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    sizes = stats_sizes(model, layers, images, settings)
    log.info("auto: %d layers, %d encodings; input statistics on %d to %d images per layer", len(layers),
             sum(len(m) for m in menus.values()), min(sizes.values()), max(sizes.values()))
    stats = float_covariances(model, layers, images, sizes, settings.search_batch, settings.seed)
    seconds["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    errors: dict[str, dict[str, float]] = {}
    fits: dict[str, dict[str, Fit]] = {}
    for n in progress(list(layers), len(layers), "auto: menu fits", "layers"):
        w = layers[n].weight.detach().float()
        H = stats[n][0]
        fits[n] = fit_menu(w, menus[n], H, damping=settings.damping, em_iters=settings.menu_em_iters, generator=gen)
        errors[n] = {label: fit.error for label, fit in fits[n].items()}
        spectra = {}
        for enc in menus[n]:
            if enc.rank:
                base = enc.without_adapter().label
                if base not in spectra:
                    spectra[base] = adapter_spectrum(w, fits[n][base].weight, H, settings.damping)
                errors[n][enc.label] = float(spectra[base][min(enc.rank, len(spectra[base]) - 1)])
        fits[n] = {r: fits[n][r] for r in _references(errors[n], menus[n])}
    seconds["menu"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sensitivity: dict[str, list] = {}
    if settings.harm == "kl":
        x = images.subset(settings.sens_images, settings.seed + 1).take(
            np.arange(min(settings.sens_images, len(images))))
        probe = SensitivityProbe(model, layers, x)
        for n in progress(list(layers), len(layers), "auto: sensitivity", "layers"):
            refs = _references(errors[n], menus[n])
            sensitivity[n] = [{"encoding": r, "error": errors[n][r],
                               "kl": probe.kl(n, fits[n][r].weight, _corrected_bias(layers[n], fits[n][r].weight,
                                                                                    stats[n][1]))}
                              for r in refs]
    seconds["sensitivity"] = time.perf_counter() - t0
    return Measured(layers, menus, sizes, stats, errors, fits, sensitivity, seconds)


def harm_table(measured: Measured, harm: str = "kl") -> dict[str, dict[str, float]]:
    """Each layer's harm per encoding label: "kl", the measured KL carried along the output error
    (`_harm_curve`), or "output", the relative output error itself."""
    if harm == "output":
        return {n: dict(e) for n, e in measured.errors.items()}
    out = {}
    for n, errs in measured.errors.items():
        points = [(p["error"], p["kl"]) for p in measured.sensitivity.get(n, [])]
        curve = _harm_curve(points) if points else (lambda e: 0.0)
        out[n] = {label: curve(e) for label, e in errs.items()}
    return out


def search_auto(model: nn.Module, settings: AutoSettings, calib=None) -> Plan:
    """Choose and fit every layer's encoding within settings.budget_bytes (see the module doc)."""
    if calib is None or len(calib) == 0:
        raise DataError("a size target needs calibration images")
    if settings.budget_bytes is None or not settings.costs:
        raise SettingsError("method auto needs a size target (target_ratio or target_size): it chooses every "
                            "layer's encoding under that many bytes")
    t_start = time.perf_counter()
    menus = menus_of(model, settings)
    for n, menu in menus.items():
        missing = [e.label for e in menu if e.label not in settings.costs.get(n, {})]
        if missing:
            raise SettingsError(f"no byte cost for {n}: {', '.join(missing)}")
    measured = measure_menu(model, settings, calib)
    seconds = dict(measured.seconds)
    harm = harm_table(measured, settings.harm)

    t0 = time.perf_counter()
    layers = measured.layers
    cost = {n: {e.label: int(settings.costs[n][e.label]) for e in menus[n]} for n in layers}
    choice = choose(harm, cost, int(settings.budget_bytes))
    chosen = {n: Encoding.parse(choice.options[n]) for n in layers}
    seconds["choice"] = time.perf_counter() - t0
    log.info("auto: chose %s (%d of %d bytes, predicted harm %.4g%s) in %.1f s", encoding_summary(
        [chosen[n] for n in layers]), choice.cost, settings.budget_bytes, choice.harm,
        "" if choice.exact else f", exact optimum at least {choice.lower_bound:.4g}", seconds["choice"])

    t0 = time.perf_counter()
    student, results = fit_choice(model, measured, chosen, settings, calib)
    seconds["fit"] = time.perf_counter() - t0
    ft = {}
    steps = settings.finetune_steps_for(choice.harm)
    if steps:
        t0 = time.perf_counter()
        ft = finetune_choice(model, student, results, dataclasses.replace(settings, finetune_steps=steps), calib)
        seconds["finetune"] = time.perf_counter() - t0
    else:
        why = ("finetune_steps 0" if settings.finetune_steps == 0 else
               f"predicted harm {choice.harm:.4g} <= {FINETUNE_ABOVE:g}")
        ft = {"steps": 0, "skipped": why}
        log.info("auto: no fine-tuning (%s)", why)

    plans, table = [], {}
    for n in layers:
        enc = chosen[n]
        info = {"encoding": enc.label, "bytes": cost[n][enc.label], "harm": harm[n][enc.label],
                "output_error": measured.errors[n][enc.label], "fit_error": results[n]["error"]}
        table[n] = info
        plans.append(_layer_plan(n, layers[n], enc, results[n], info))
    seconds["total"] = time.perf_counter() - t_start
    meta = {"auto": {"budget_bytes": int(settings.budget_bytes), "encodings_bytes": choice.cost,
                     "predicted_harm": choice.harm, "choice_exact": choice.exact,
                     "choice_lower_bound": choice.lower_bound, "frontier": choice.frontier,
                     "harm": settings.harm, "families": list(settings.families),
                     "summary": encoding_summary([chosen[n] for n in layers]), "layers": table,
                     "sensitivity": measured.sensitivity, "errors": measured.errors, "seconds": seconds,
                     "finetune": ft},
            # the report's search_phases (wall seconds; CoRa's and PQ's have CPU seconds too)
            "phases": {k: {"seconds": round(v, 3)} for k, v in seconds.items() if k != "total"}}
    log.info("auto: done in %.1f s (%s)", seconds["total"], ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return Plan(method="auto", settings={"method": "auto", **settings.to_json()}, layers=tuple(plans), meta=meta)


def fit_choice(model: nn.Module, measured: Measured, chosen: dict[str, Encoding], settings: AutoSettings, calib):
    """Phase 5: the chosen encodings fitted to the float weights on the float network's input
    statistics (the default; em_iters EM iterations for codebooks), or layer after layer to the
    float network's output on the partially quantized network (settings.refit); returns (the
    student model with them, per layer {fit, adapter, bias, error})."""
    gen = torch.Generator().manual_seed(settings.seed)
    if settings.refit:
        images = as_torch(calib).subset(settings.calib_size, settings.seed)
        return _refit(model, measured.layers, chosen, images, measured.sizes, settings, gen)
    fits = {}
    for n in progress(list(measured.layers), len(measured.layers), "auto: fitting the choice", "layers"):
        base = chosen[n].without_adapter()
        fits[n] = fit_encoding(measured.layers[n].weight.detach().float(), base, measured.stats[n][0],
                               damping=settings.damping, em_iters=settings.em_iters, generator=gen)
    return _fitted_as_measured(model, measured.layers, chosen, fits, measured.stats, settings)


def _fitted_as_measured(model, layers, chosen, fits, stats, settings):
    """The menu fits of the chosen encodings as they are (no sequential fit): biases moved by the
    float input means so each layer's output mean is the float one."""
    student = copy.deepcopy(model).eval()
    slayers = quantizable_layers(student)
    results = {}
    for n, mod in layers.items():
        w = mod.weight.detach().float()
        fit = fits[n]
        H, mu = stats[n]
        w_hat, adapter = fit.weight, None
        if chosen[n].rank:
            adapter = _adapter(w, w_hat, H, chosen[n], settings)
            w_hat = w_hat + (adapter[0] @ adapter[1]).reshape(w.shape)
        bias = _corrected_bias(mod, w_hat, mu)
        _set(slayers[n], w_hat, bias)
        results[n] = {"fit": fit, "adapter": adapter, "bias": bias, "error": relative_error(w, w_hat, H)}
    return student, results


def _corrected_bias(mod: nn.Module, w_hat: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The layer's bias moved by the float input means mu so its output mean stays the float one
    with the weight w_hat (as the fit leaves it)."""
    w = mod.weight.detach().float()
    b0 = mod.bias.detach().float() if mod.bias is not None else torch.zeros(w.shape[0])
    return b0 + _mean_response(w - w_hat.reshape(w.shape), mu)


def _mean_response(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """W E[x] per output channel, mu (G, K) per conv group."""
    c = w.shape[0]
    w2 = w.reshape(c, -1)
    gidx = torch.arange(c) // (c // mu.shape[0])
    return (w2 * mu[gidx]).sum(1)


def _set(mod: nn.Module, w: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        mod.weight.copy_(w.reshape(mod.weight.shape))
        if mod.bias is None:
            mod.bias = nn.Parameter(bias.clone())
        else:
            mod.bias.copy_(bias)


def _adapter(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, enc: Encoding,
             settings: AutoSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's factors (B (C, r), A (r, K)) on their adapter_bits grids (per row, symmetric)."""
    b, a = adapter_factors(w, w_hat, H, enc.rank, settings.damping)
    return _grid_rows(b, enc.adapter_bits), _grid_rows(a, enc.adapter_bits)


def _grid_rows(t: torch.Tensor, bits: int) -> torch.Tensor:
    spec = QuantSpec(bits=bits, per_channel=True, symmetric=True, clip="minmax")
    return quantize_weight(t, spec).dequantize().float()


def _refit(model, layers, chosen, images, sizes, settings, gen):
    """Phase 5 (module doc): returns the student (the chosen weights in) and per layer its fit,
    adapter factors, bias and error against the float network's output."""
    student = copy.deepcopy(model).eval()
    slayers = quantizable_layers(student)
    order = list(layers)
    feed = LayerFeed(model, student, slayers, order, sizes, images, settings.seed, settings.search_batch)
    results = {}
    for n in progress(order, len(order), "auto: fitting the choice", "layers"):
        tmod, smod = layers[n], slayers[n]
        w = tmod.weight.detach().float()
        c, k = w.shape[0], row_width(tuple(w.shape))
        groups = int(getattr(tmod, "groups", 1))
        geom = Geom(n, "auto", k * 1, groups, 1)
        b0 = tmod.bias.detach().float() if tmod.bias is not None else torch.zeros(c)
        if isinstance(tmod, nn.Linear):  # its own weight: the float target would fit the calibration classes
            H, mu = input_stats(student, smod, Geom(n, "linear", k, 1, 1), None, settings.search_batch, full=True,
                                centered=True, inputs=feed.student_inputs(n, smod))
            H, mu = H.reshape(1, k, k), mu.reshape(1, k)
            target, target_mean = w, feed.teacher_output_mean(n, tmod)
        else:
            joint = joint_stats(model, tmod, student, smod, geom, None, settings.search_batch, centered=True,
                                pairs=feed.pairs(n, tmod, smod), moments=("qq", "qf"))
            H, mu = joint["qq"], joint["mu_q"]
            target = float_target(w.reshape(c, -1), H, joint["qf"], settings.damping).reshape(w.shape)
            target_mean = _mean_response(w, joint["mu_f"]) + b0
        fit = fit_encoding(target, chosen[n], H, damping=settings.damping, em_iters=settings.em_iters, generator=gen)
        w_hat, adapter = fit.weight, None
        if chosen[n].rank:
            adapter = _adapter(target, w_hat, H, chosen[n], settings)
            w_hat = w_hat + (adapter[0] @ adapter[1]).reshape(w.shape)
        bias = target_mean - _mean_response(w_hat, mu)
        _set(smod, w_hat, bias)
        results[n] = {"fit": fit, "adapter": adapter, "bias": bias, "error": relative_error(target, w_hat, H)}
    return student, results


def finetune_choice(model: nn.Module, student: nn.Module, results: dict, settings: AutoSettings, calib) -> dict:
    """Phase 6: settings.finetune_steps steps of distillation, from the float `model`, of the
    codewords and channel scales of every codebook (codes fixed), the scales of every grid below 8
    bits (integers fixed), the adapter factors and every bias, in `results` (updated in place;
    fit_choice's); returns the loss summary."""
    from torch.func import functional_call

    from cora_onnx.torch.search.distill import augment_batch, distill_loss

    slayers = quantizable_layers(student)
    params, base = {}, {}
    for n, r in results.items():
        base[n] = (r["fit"].weight.detach(), tuple(slayers[n].weight.shape))
        bias = r["bias"].detach().clone().requires_grad_(True)
        ps = {"bias": bias}
        ps.update(_encoding_params(r["fit"]))
        if r["adapter"] is not None:
            ps["b"] = r["adapter"][0].detach().clone().requires_grad_(True)
            ps["a"] = r["adapter"][1].detach().clone().requires_grad_(True)
        params[n] = ps
    # Adam steps of finetune_lr times each tensor's RMS (as CoRa's fine-tuning)
    groups = [{"params": [p], "lr": settings.finetune_lr * float(p.detach().pow(2).mean().sqrt()) + 1e-8}
              for ps in params.values() for p in ps.values()]
    opt = torch.optim.Adam(groups)
    images = as_torch(calib).subset(settings.calib_size, settings.seed)
    gen = torch.Generator().manual_seed(settings.seed + 2)
    per_step = settings.augment != "none"  # the float model's outputs on each augmented batch
    teacher = None
    if not per_step:
        with torch.no_grad():
            teacher = torch.cat([model(_fast(x)) for x in images.batches(64)])
    n_img = len(images)
    losses = []
    t0 = time.perf_counter()
    for _ in progress(range(settings.finetune_steps), settings.finetune_steps, "auto: fine-tuning", "steps"):
        idx = torch.randint(n_img, (settings.search_batch,), generator=gen)
        x = images.preprocess.normalize(images.images[idx])
        if per_step:
            x = _fast(augment_batch(x, settings.augment, gen))
            with torch.no_grad():
                target = model(x)
        else:
            x, target = _fast(x), teacher[idx]
        overrides = {}
        for n, ps in params.items():
            w, shape = base[n]
            w = _fitted_weight(results[n]["fit"], ps, shape, w)
            if "a" in ps:
                w = w + (ps["b"] @ ps["a"]).reshape(shape)
            overrides[f"{n}.weight"] = w
            overrides[f"{n}.bias"] = ps["bias"]
        loss = distill_loss(functional_call(student, overrides, (x,)), target, settings.distill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for n, ps in params.items():  # the factors go back onto their grids in the plan (_layer_plan)
        results[n]["bias"] = ps["bias"].detach()
        results[n]["fit"] = _tuned_fit(results[n]["fit"], ps, base[n][1])
        if "a" in ps:
            results[n]["adapter"] = (ps["b"].detach(), ps["a"].detach())
    k = max(1, len(losses) // 10)
    out = {"steps": len(losses), "loss": settings.distill, "loss_first": float(np.mean(losses[:k])),
           "loss_last": float(np.mean(losses[-k:])), "seconds": time.perf_counter() - t0}
    log.info("auto: fine-tuning %d steps, %s loss %.4g -> %.4g (%.1f s)", out["steps"], out["loss"],
             out["loss_first"], out["loss_last"], out["seconds"])
    return out


def _fast(x: torch.Tensor) -> torch.Tensor:
    """A batch of images in channels-last memory: CPU convolutions then take their faster kernels
    (as CoRa's and PQ's fine-tuning; tools/bench_channels_last.py measures the gain)."""
    return x.contiguous(memory_format=torch.channels_last)


def _encoding_params(fit: Fit) -> dict[str, torch.Tensor]:
    """The trainable float parts of a fitted encoding: a codebook's codewords and channel scales, a
    grid's scales below 8 bits (the integers, codes and 8-bit grids stay)."""
    out = {}
    if fit.codebook is not None:
        out["codewords"] = fit.codebook.codewords.detach().float().clone().requires_grad_(True)
        if fit.codebook.scale is not None:
            out["channel_scale"] = fit.codebook.scale.detach().float().clone().requires_grad_(True)
    elif fit.grid is not None and fit.grid.spec.bits < 8:
        out["grid_scale"] = fit.grid.scale.detach().float().clone().requires_grad_(True)
    return out


def _fitted_weight(fit: Fit, ps: dict, shape: tuple, w: torch.Tensor) -> torch.Tensor:
    """The layer's weight from its trainable parts `ps` (w, the fitted weight, when it has none)."""
    if "codewords" in ps:
        w = ps["codewords"][fit.codebook.codes]
        if "channel_scale" in ps:
            w = w * ps["channel_scale"][:, None, None]
        return w.reshape(shape)
    if "grid_scale" in ps:
        return dataclasses.replace(fit.grid, scale=ps["grid_scale"]).dequantize().float().reshape(shape)
    return w


def _stored(t: torch.Tensor, half: bool) -> torch.Tensor:
    """A fine-tuned float as the file stores it: float16 (a codebook's parts, group scales) or
    float32, scales kept positive."""
    t = t.detach().float()
    return t.clamp(-65504.0, 65504.0).half().float() if half else t


def _tuned_fit(fit: Fit, ps: dict, shape: tuple) -> Fit:
    """The Fit with its fine-tuned codewords / scales (rounded as stored) and its weight from them."""
    if "codewords" in ps:
        scale = ps.get("channel_scale")
        pq = dataclasses.replace(fit.codebook, codewords=_stored(ps["codewords"], True),
                                 scale=None if scale is None else _stored(scale.abs().clamp_min(2.0 ** -14), True))
        return dataclasses.replace(fit, codebook=pq, weight=pq.weight().reshape(shape).float())
    if "grid_scale" in ps:
        tiny = float(torch.finfo(torch.float16).tiny)
        scale = _stored(ps["grid_scale"].abs().clamp_min(tiny), bool(fit.grid.spec.group)).to(fit.grid.scale.dtype)
        grid = dataclasses.replace(fit.grid, scale=scale)
        return dataclasses.replace(fit, grid=grid, weight=grid.dequantize().float().reshape(shape))
    return fit


def plan_layers(measured: Measured, chosen: dict[str, Encoding], results: dict) -> tuple[LayerPlan, ...]:
    """The LayerPlans of fitted (and fine-tuned) results: what the file stores (adapter factors on
    their grids, float16 biases), e.g. for cora_onnx.torch.export.apply_plan_torch."""
    return tuple(_layer_plan(n, measured.layers[n], chosen[n], results[n], {"encoding": chosen[n].label})
                 for n in measured.layers)


def _layer_plan(name: str, mod: nn.Module, enc: Encoding, r: dict, info: dict) -> LayerPlan:
    """The LayerPlan of a fitted layer: its grid or codebook, adapter (factors on their grids) and
    bias (float16 when it fits)."""
    shape, kind, _ = layer_facts(mod)
    fit: Fit = r["fit"]
    uniform = codebook = adapter = None
    if fit.grid is not None:
        uniform = uniform_from(fit.grid)
    else:
        pq = fit.codebook
        codebook = Codebook(block_size=enc.block, codewords=pq.codewords.detach().numpy().astype(np.float16),
                            codes=pq.codes.numpy().astype(np.uint8),
                            scale=None if pq.scale is None else pq.scale.detach().numpy().astype(np.float16))
    if r["adapter"] is not None:
        b, a = r["adapter"]
        bq = quantize_weight(b, QuantSpec(bits=enc.adapter_bits, clip="minmax"))
        aq = quantize_weight(a, QuantSpec(bits=enc.adapter_bits, clip="minmax"))
        adapter = LowRankAdapter(rank=enc.rank, a=aq.dequantize().float().numpy().reshape(enc.rank, *shape[1:]),
                                 b=bq.dequantize().float().numpy().reshape(shape[0], enc.rank, 1, 1),
                                 bits=enc.adapter_bits, a_scale=aq.scale.float().numpy(),
                                 b_scale=bq.scale.float().numpy())
    return LayerPlan(name=name, kind=kind, shape=shape, uniform=uniform, codebook=codebook, adapter=adapter,
                     bias=Bias.narrowest(r["bias"].detach().float().numpy()), info=info)
