"""search_pq: layers quantized in order, each fitted on statistics of the network whose earlier
layers are already quantized, then the fine-tuning (see the package doc)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
import time

import numpy as np
import torch
from torch import nn

from cora_onnx.core.encoding import Encoding, skeleton
from cora_onnx.core.errors import DataError, ModelError, SettingsError
from cora_onnx.core.plan import Bias, Codebook, LayerPlan, Plan
from cora_onnx.core.progress import Phases, progress
from cora_onnx.torch.quantizers import WIDE_K, QuantSpec, gptq_round, input_weighted_clip, output_error, quantizable_layers, quantize_weight
from cora_onnx.torch.images import as_torch
from cora_onnx.torch.search.layers import layer_kind, select_layers, skeleton_layer, uniform_from
from cora_onnx.torch.search.staged import LayerFeed
from cora_onnx.torch.search.pq.codebook import (assign_with_feedback, fit_codebook, float_output_error, float_target,
                                                float_target_spans, full_error, span_width)
from cora_onnx.torch.search.pq.finetune import finetune
from cora_onnx.torch.search.pq.settings import PqSettings, block_kind
from cora_onnx.torch.search.pq.statistics import (Geom, input_stats, joint_stats, output_means, patches_per_image,
                                                  span_stats)

__all__ = ["search_pq", "fit_layers", "pq_layers", "rehearsal_pq"]

log = logging.getLogger(__name__)


def _diagonal_blocks(H: torch.Tensor, geom: Geom) -> torch.Tensor:
    """(G, ..., m*d, m*d) full per-group matrix -> its (G, m, d, d) diagonal blocks."""
    G, m, d = geom.groups, geom.m, geom.d
    return torch.diagonal(H.reshape(G, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()


def _geometry(name: str, mod: nn.Module, settings: PqSettings) -> Geom:
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
        if per_filter % small:  # e.g. a Linear of 6 inputs: the largest block below the small one that fits
            small = math.gcd(per_filter, small)
        log.info("%s: %s block size %d does not divide %d weights per filter; using %d", name, settings.blocks, d,
                 per_filter, small)
        d = small
    return Geom(name, kind, d, groups, per_filter // d)


def _stored_bias(b: torch.Tensor) -> np.ndarray:
    """float16 (half the bytes; its rounding, 2^-11 of each value, is far below the PQ error) unless
    a value is out of float16's range, then float32."""
    b16 = b.half()
    return (b16 if bool(torch.isfinite(b16).all()) else b.float()).numpy()


def stats_sizes(model: nn.Module, layers: dict[str, nn.Module], images, settings: PqSettings) -> dict[str, int]:
    """Statistics images per layer: stats_size, raised (up to every calibration image) until the
    layer sees stats_patches patches per input it has (K = C_in/groups * kh * kw): a 7x7 map gives
    49 patches per image, the classifier one, so a few dozen images leave the late layers' input
    statistics rank-deficient on ten classes while the early layers have plenty."""
    if settings.stats_patches == 0:
        return {n: min(settings.stats_size, len(images)) for n in layers}
    per_image = patches_per_image(model, layers, next(images.batches(1)))
    return {n: min(len(images), max(settings.stats_size,
                                    -(-settings.stats_patches * int(layers[n].weight[0].numel()) // per_image[n])))
            for n in layers}


def _gptq_rounded(name: str, mod: nn.Module, settings: PqSettings) -> bool:
    """Whether a uniform layer is GPTQ-rounded: uniform_rounding "gptq", named by a uniform_layers
    pattern (a layer kept only by the selection, e.g. the first, is rounded to nearest) and not grouped."""
    return (settings.uniform_rounding == "gptq" and getattr(mod, "groups", 1) == 1
            and any(fnmatch.fnmatchcase(name, p) for p, _ in settings.uniform_patterns()))


def _output_mean(w: torch.Tensor, mu_f: torch.Tensor, tmod: nn.Module, groups: int) -> torch.Tensor:
    """The float network's output mean of a layer, W E[x_f] + b (w (C_out, ...), mu_f (G, K))."""
    w2 = w.reshape(w.shape[0], -1)
    gidx = torch.arange(w.shape[0]) // (w.shape[0] // groups)
    return (w2 * mu_f[gidx]).sum(1) + (tmod.bias.detach().float() if tmod.bias is not None else 0.0)


def _wide_statistics(tmod: nn.Module, mod: nn.Module, name: str, g: Geom, w: torch.Tensor, feed: LayerFeed,
                     feedback: bool, settings: PqSettings):
    """The statistics of a layer wider than WIDE_K (statistics.span_stats: no K x K moment, K x
    span_width(d) values and, with the float target, its correction K x C_out): (the sub-vectors
    to fit (C_out, m, d), the EM's d x d blocks (G, m, d, d), the error feedback's codebook.Spans
    (None without feedback), the mean input (G, K), the float network's output mean (None unless
    the float target with bias correction))."""
    w2 = w.reshape(w.shape[0], -1)
    centered, mean = settings.bias_correction, None
    if settings.target_for(name) == "float":
        st = span_stats(mod, g, span_width(g.d), feed.pairs(name, tmod, mod), w=w2, centered=centered)
        wv = float_target_spans(w2, st["qq"], st.pop("residual"), settings.damping)
        if centered:
            mean = _output_mean(w, st["mu_f"], tmod, g.groups)
    else:
        st = span_stats(mod, g, span_width(g.d), feed.student_inputs(name, mod), centered=centered)
        wv = w2
    return (wv.reshape(w.shape[0], g.m, g.d), st["qq"].blocks_of(g.d).contiguous(), st["qq"] if feedback else None,
            st["mu_q"], mean)


def _fit_uniform_gptq(teacher: nn.Module, tmod: nn.Module, student: nn.Module, mod: nn.Module, name: str, bits: int,
                      feed: LayerFeed, targets: dict[str, torch.Tensor], settings: PqSettings) -> LayerPlan:
    """A uniform layer (groups 1) rounded by GPTQ on the student's input statistics: to the float
    network's output of the layer (target "float": W* = H_qq^-1 H_qf W, rounded under H_qq) or to
    its own float weight; then the bias correction. Writes the rounded weight into `mod`."""
    t0 = time.perf_counter()
    w = mod.weight.detach().float().clone()
    w2 = w.reshape(w.shape[0], -1)
    K = w2.shape[1]
    g = Geom(name, block_kind(mod), K, 1, 1)
    centered = settings.bias_correction
    if settings.target_for(name) == "float":
        joint = joint_stats(teacher, tmod, student, mod, g, None, settings.search_batch, centered=centered,
                            pairs=feed.pairs(name, tmod, mod), moments=("qq", "qf"))
        H, mu = joint["qq"][0], joint["mu_q"][0]
        wt = float_target(w2, joint["qq"], joint["qf"], settings.damping)
        fb = tmod.bias
        target_mean = w2 @ joint["mu_f"][0] + (fb.detach().float() if fb is not None else 0.0)
    else:
        H, mu = input_stats(student, mod, g, None, settings.search_batch, full=True, centered=centered,
                            inputs=feed.student_inputs(name, mod))
        H, mu = H.reshape(K, K), mu[0]
        wt, target_mean = w2, targets.get(name)
    spec = QuantSpec(bits=bits)
    wt4 = wt.reshape(w.shape)
    grid = input_weighted_clip(wt4, spec, H) if settings.uniform_clip == "input" else quantize_weight(wt4, spec)
    qt = gptq_round(wt4, grid, H, damp=settings.damping, act_order=settings.uniform_act_order)
    w_hat = qt.dequantize().reshape(w2.shape).float()
    bias = None
    with torch.no_grad():
        mod.weight.copy_(w_hat.reshape(w.shape))
        if settings.bias_correction:
            b = target_mean - w_hat @ mu
            if mod.bias is None:
                mod.bias = nn.Parameter(b.clone())
            else:
                mod.bias.copy_(b)
            bias = Bias(values=b.numpy().astype(np.float32))
    err = float((w_hat - w2).pow(2).mean() / w2.pow(2).mean().clamp_min(1e-30))
    rel = output_error(wt, w_hat, H) / max(output_error(wt, torch.zeros_like(wt), H), 1e-30)
    log.info("%s: uniform %d bits (GPTQ, target %s, clip %s%s), activation-weighted error %.4f, relative weight MSE "
             "%.4f (%.1f s)", name, bits, settings.target_for(name), settings.uniform_clip,
             ", act-order" if settings.uniform_act_order else "", rel, err, time.perf_counter() - t0)
    return LayerPlan(name=name, kind=layer_kind(mod), shape=tuple(w.shape), uniform=uniform_from(qt), bias=bias,
                     info={"relative_weight_mse": err, "activation_weighted_error": rel, "rounding": "gptq",
                           "clip": settings.uniform_clip, "act_order": settings.uniform_act_order,
                           "seconds": time.perf_counter() - t0})


def fit_layers(model: nn.Module, layers: dict[str, nn.Module], order: list[str], kept: dict[str, int],
               geoms: dict[str, Geom], images, settings: PqSettings):
    """The per-layer phase of `search_pq`, layer after layer in `order` on a copy of the model
    (the student): kept layers onto the uniform grid, the others fitted (EM, error feedback, bias
    correction) on statistics of the student whose earlier layers are already quantized. Returns
    (student, its layers, state: name -> codewords / codes / scale / bias, name -> LayerPlan)."""
    bs = settings.search_batch
    gen = torch.Generator().manual_seed(settings.seed)
    student = copy.deepcopy(model).eval()
    slayers = quantizable_layers(student)
    sizes = stats_sizes(model, layers, images, settings)
    if settings.stats_patches:
        log.info("statistics images per layer: %d to %d (stats_patches %d)", min(sizes.values()),
                 max(sizes.values()), settings.stats_patches)
    # the float output means on the very images the student's input means come from: on other
    # images the sampling difference of the two means goes into the bias (EfficientNet-Lite0:
    # 8.5% relative error in the first depthwise layer's output mean with 64 vs 16 images). With
    # the float target they come from the same pass as the joint statistics (W E[x_f] + b)
    targets: dict[str, torch.Tensor] = {}
    gptq = {n for n in kept if _gptq_rounded(n, slayers[n], settings)}
    measured = [n for n in order if n not in kept or n in gptq]
    feed = LayerFeed(model, student, slayers, measured, sizes, images, settings.seed, bs,
                     cache_bytes=settings.cache_bytes)
    by_weight = [n for n in [*geoms, *gptq] if settings.target_for(n) == "weight"]
    if settings.bias_correction and by_weight and not feed.staged:  # one float pass per distinct image count
        for size in sorted({sizes[n] for n in by_weight}):
            same = {n: layers[n] for n in by_weight if sizes[n] == size}
            targets.update(output_means(model, same, images.subset(size, settings.seed), bs))
    state: dict[str, dict] = {}
    plans: dict[str, LayerPlan] = {}
    for name in progress(order, len(order), "pq: layers", "layers"):
        mod = slayers[name]
        if settings.bias_correction and name in by_weight and name not in targets:  # staged: from the cache
            targets[name] = feed.teacher_output_mean(name, layers[name])
        t0 = time.perf_counter()
        w = layers[name].weight.detach().float()  # the float weight, as the student's still is: the teacher's, no copy
        if name in gptq:
            plans[name] = _fit_uniform_gptq(model, layers[name], student, mod, name, kept[name], feed, targets,
                                            settings)
            continue
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
        # above WIDE_K the measures that only inform (the float-output errors, the error without
        # feedback) are left out: each needs K x K moments (the wide route makes none) and a C_out K^2 product
        wide = g.m * g.d > WIDE_K
        # with bias correction the mean shift of the output is absorbed by the bias: fit the covariance.
        # Post-ReLU inputs have means far above their spread, and the second moment would spend the
        # codebook on the mean response
        joint = Hfull = None
        if wide:  # no K x K: span blocks (and the float target's correction) only
            wv, H, Hfull, mu, mean = _wide_statistics(layers[name], mod, name, g, w, feed, feedback, settings)
            if mean is not None:
                targets[name] = mean
        elif settings.target_for(name) == "float":  # fit the float network's output: PQ of W* under H_qq
            joint = joint_stats(model, layers[name], student, mod, g, None, bs, centered=settings.bias_correction,
                                pairs=feed.pairs(name, layers[name], mod))
            H, mu = joint["qq"].reshape(g.groups, 1, g.m * g.d, g.m * g.d), joint["mu_q"]
            wv = float_target(w.reshape(w.shape[0], -1), joint["qq"], joint["qf"], settings.damping)
            if settings.bias_correction:  # the float network's output mean: W E[x_f] + b
                targets[name] = _output_mean(w, joint["mu_f"], layers[name], g.groups)
            wv = wv.reshape(w.shape[0], g.m, g.d)
            if not feedback:
                H = _diagonal_blocks(H, g)
        else:
            H, mu = input_stats(student, mod, g, None, bs, full=feedback, centered=settings.bias_correction,
                                inputs=feed.student_inputs(name, mod))
            wv = w.reshape(w.shape[0], g.m, g.d)
        if feedback and not wide:  # diagonal blocks for the EM, the full matrix for the sequential assignment
            Hfull = H.reshape(g.groups, g.m * g.d, g.m * g.d)
            H = _diagonal_blocks(H, g)
        fit = fit_codebook(wv, H, settings.codewords, settings.em_iters, channel_scale=settings.channel_scale,
                           damping=settings.damping, generator=gen)
        extra = {}
        if joint is not None:  # the error if this layer stayed float, and if it were the exact target W*
            wflat = w.reshape(w.shape[0], -1)
            extra["float_output_error_of_float_weight"] = float_output_error(wflat, wflat, joint)
            extra["float_output_error_of_target"] = float_output_error(wflat, wv.reshape(w.shape[0], -1), joint)
        if Hfull is not None:  # both errors are in the log line below
            if not wide:
                extra["full_error_without_feedback"] = full_error(wv, Hfull, fit.weight())
            fit = assign_with_feedback(wv, Hfull, fit)
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
                  if "full_error_without_feedback" in extra else
                  f" (diagonal blocks, wider than {WIDE_K}: error feedback in spans)" if Hfull is not None else "")
                 + (f", error vs the float network's output {extra['float_output_error']:.4f} (float weight: "
                    f"{extra['float_output_error_of_float_weight']:.4f}, target W*: "
                    f"{extra['float_output_error_of_target']:.4f})" if joint is not None else ""),
                 werr, time.perf_counter() - t0)
    return student, slayers, state, plans


def pq_layers(layers: dict[str, nn.Module], settings: PqSettings) -> tuple[list[str], dict[str, int], dict[str, Geom]]:
    """Which layers search_pq plans, and how: all but selection.skip in order; those kept on a
    uniform grid (the selection's keep, uniform_layers: name -> bits); the geometry (block size)
    of the product-quantized others. ModelError without a layer; SettingsError for a pattern that
    names no layer."""
    if not layers:
        raise ModelError("the model has no Conv2d/Linear layer to quantize")
    # which layers: keep -> uniform at keep_bits, skip -> float, the rest -> PQ (validated first)
    kept = {n: b for n, b in select_layers(layers, 0, settings.selection).items() if b}
    order = [n for n in layers if n not in settings.selection.skip]
    for pattern, bits in settings.uniform_patterns():  # later entries win
        hits = [n for n in order if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SettingsError(f"uniform_layers entry {pattern!r} names no quantized layer of the model")
        kept.update({n: bits or settings.selection.keep_bits for n in hits})
    geoms = {n: _geometry(n, layers[n], settings) for n in order if n not in kept}
    for pattern in settings.weight_target_layers:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in geoms):
            raise SettingsError(f"weight_target_layers entry {pattern!r} names no product-quantized layer of the "
                                "model")
    for pattern in settings.layer_patterns():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in geoms):
            shown = ", ".join(list(geoms)[:6]) + (", ..." if len(geoms) > 6 else "")
            raise SettingsError(f"block_size entry {pattern!r} is neither a kernel kind (1x1, kxk, <kh>x<kw>, "
                                f"depthwise, linear) nor the name of a product-quantized layer ({shown})")
    return order, kept, geoms


def rehearsal_pq(model: nn.Module, settings: PqSettings) -> tuple[Plan, ...]:
    """What search_pq writes, zero-filled: the kept layers' grids (skeleton_layer; with the float32
    corrected bias when GPTQ-rounded), the others' codebooks of their block size (pq_layers), with
    the float16 channel scales (channel_scale) and the float16 corrected bias it stores with them."""
    layers = quantizable_layers(model)
    order, kept, geoms = pq_layers(layers, settings)
    out = []
    for n in order:
        mod = layers[n]
        if n in kept:
            gptq = settings.bias_correction and _gptq_rounded(n, mod, settings)
            out.append(skeleton_layer(n, mod, QuantSpec(bits=kept[n]), bias="float32" if gptq else None))
            continue
        lp = skeleton(n, tuple(mod.weight.shape), layer_kind(mod), Encoding("pq", block=geoms[n].d,
                                                                         codewords=settings.codewords), bias=False)
        cb = dataclasses.replace(lp.codebook, scale=lp.codebook.scale if settings.channel_scale else None,
                                 bias=np.zeros(lp.shape[0], np.float16))
        out.append(dataclasses.replace(lp, codebook=cb))
    return (Plan("pq", {}, tuple(out)),)


def search_pq(model: nn.Module, settings: PqSettings, calib=None) -> Plan:
    """Product-quantize every selected Conv2d/Linear of a BN-fused model (see module doc)."""
    if calib is None or len(calib) == 0:
        raise DataError("pq needs calibration images")
    model = model.eval()
    layers = quantizable_layers(model)
    order, kept, geoms = pq_layers(layers, settings)
    images = as_torch(calib).subset(settings.calib_size, settings.seed)
    t_start = time.perf_counter()

    phases = Phases()
    with phases("layers", desc="pq: layer fits"):
        student, slayers, state, plans = fit_layers(model, layers, order, kept, geoms, images, settings)

    ft_info: dict = {}
    if settings.finetune_steps and state:
        with phases("fine-tuning", desc="pq: fine-tuning"):
            ft_info = finetune(model, student, slayers, state, images, settings,
                               torch.Generator().manual_seed(settings.seed + 1))

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
                meta={"pq_seconds": seconds, "pq_finetune": ft_info, "phases": phases.to_json()})
