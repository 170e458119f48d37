"""CoRa (Luo et al., BMVC 2024): low-bit weights plus low-rank convolutional adapters that reclaim
the quantization residual, with ranks searched by a differentiable Butterworth cutoff per layer.

The search is cheap: a layer's Butterworth-weighted correction is merged into its conv weight in
the forward pass (W_q + B diag(T(c)^2) A, one conv per layer) instead of running two extra
full-rank convolutions, and only the cutoffs c_l are trained. Beyond the paper (the `default`
preset; `reference` reproduces the paper's choices):

- grid: per-channel symmetric, each channel's range the one with the least layer-output error on
  the input statistics, instead of per-tensor mean +/- k std;
- rounding: error-feedback (GPTQ, act-order) rounding on the layer's input statistics (full rank:
  every output position of 512 images, streamed by search/stats.py) instead of nearest;
- residual: decomposed in the metric of the layer's inputs (SVD of R C with C C^T the input
  second moment), so the top singular directions are those that matter for the layer *output*;
- statistics: each quantized layer's output is corrected toward the float network's per-channel
  mean and std (absorbed into the per-channel scales and the bias), instead of BatchNorm
  re-estimation on the calibration images;
- fine-tuning: after the ranks are fixed, the adapter factors and biases are fine-tuned by
  distillation for the rest of the iteration budget.

Grouped and depthwise convs get no adapter (the low-rank factorization of a grouped weight is a
different object); by default depthwise convs stay at 8 bits (--keep), where they cost little.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, SettingsError, check_bits
from ..quantizers import quantizable_layers
from ..plan import Bias, LayerPlan, LowRankAdapter, Plan
from ..torch_images import as_torch
from ..quantizers import CLIP_METHODS, QuantSpec, QuantizedTensor, gptq_round, input_weighted_clip, quantize_weight
from .layers import LayerSelection, layer_kind, select_layers, uniform_from
from .options import CliOption
from .distill import AUGMENTS, DISTILLS, Capture, augment_batch, distill_loss, feature_loss
from .stats import input_second_moments, input_width

__all__ = ["CoraSettings", "search_cora", "cora_report", "CORA_OPTIONS", "PRESETS", "butterworth", "augment_batch"]

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    # the paper / reference implementation
    "reference": dict(per_channel=False, symmetric=False, clip="std", k=3.0, rounding="nearest", svd="weight",
                      stats="none", iters=250, finetune_iters=0, augment="none", distill="kl", features="none",
                      gptq_passes=1, act_order=False, clip_metric="weight"),
    # the best combination measured here (see tools/measure_cora.py and docs/results/cora.md: the statistics
    # correction helped in the light ablation but lost 0.4-2.2 points in the full runs, in-class and
    # on held-out classes; act-order, the output-error clip and the logit MSE won on the many-class
    # protocol, the sequential passes did not, issue 14)
    "default": dict(per_channel=True, symmetric=True, clip="mse", k=3.0, rounding="gptq", svd="activation",
                    stats="none", iters=100, finetune_iters=40, augment="none", distill="mse", features="none",
                    gptq_passes=1, act_order=True, clip_metric="input"),
}
ROUNDINGS = ("nearest", "gptq")
SVDS = ("weight", "activation")
STATS = ("none", "mean", "float")
FEATURES = ("none", "layers")
CLIP_METRICS = ("weight", "input")


@dataclass(frozen=True)
class CoraSettings:
    """bits: weight bits (2-8); budget: adapter parameters as a fraction of the model's Conv/Linear
    weight parameters; iters: total optimization steps (rank search + fine-tuning): 250 for the
    reference preset, 100 for the default one; finetune_iters: steps of those spent fine-tuning
    adapters after the ranks are fixed; calib_size: calibration images used; batch_size: images per step; order: Butterworth
    order n; lr: Adam step on the cutoffs; gamma: weight of the budget penalty; adapter_bits:
    2-8 (per-channel symmetric) or 0 for float adapters; None: 8, or 4 with 2-3-bit weights (their
    file then shrinks with the grid: 8-bit adapters at 5% of the weights cost 0.4 bit per weight); preset: "default" or "reference" (fills
    every grid/rounding/svd/stats/finetune setting left as None); fit_classifier: False keeps Linear
    layers out of the statistics correction and the bias fine-tuning.

    Input statistics for GPTQ and the input-metric SVD (cora_onnx.search.stats): stats_size:
    calibration images they are taken from (every output position, streamed into one K x K float64
    accumulator per layer); cov_rows: input rows kept per layer, as a multiple of its input width K
    (output positions beyond that are subsampled; a layer with fewer positions keeps all of them:
    ResNet-18's layer4 has K = 4,608 and 49 positions per image, so 4 x K rows need 377 images);
    gptq_passes: 1 takes every layer's statistics from the float network; n > 1 splits the layers by
    depth into n groups and takes each group's statistics from the network whose earlier groups are
    already quantized (sequential GPTQ: later layers absorb the earlier layers' error); gptq_damp:
    added to the Hessian diagonal, times its mean (larger: closer to nearest rounding, less fitted to
    the calibration images' input statistics); act_order:
    GPTQ rounds the columns by descending input energy; clip_metric: weight (the grid's range from
    `clip`, on the weight error) or input (per channel, the range among 13 candidates, 100% to 52% of
    min/max, with the least output error sum (w - w_hat) H (w - w_hat)^T for nearest rounding).

    Levers against the calibration classes' prior (issue 14; the preset fills those left as None):
    augment: the distillation images: none (the calibration images as they are), flip (random
    horizontal flips), crop (random resized crops, 25-100% of the area, and flips), mix (crops and
    flips, then each image blended with another one of the batch, weight uniform in 0-1); the
    float model's outputs are then computed on the same augmented batch at every step.
    distill: the loss on the logits: kl (cross-entropy against the float softmax, weighted toward
    the classes the images show) or mse (squared error of all the logits, each centred per image:
    every class counts the same). features: none, or layers (adds the mean over the planned layers
    of the relative squared error of each layer's output against the float network's output of the
    same layer on the same images, times feature_weight). finetune_biases: let the fine-tuning train
    the biases (False: adapter factors only)."""

    bits: int = 4
    preset: str = "default"
    budget: float = 0.05
    iters: int | None = None
    finetune_iters: int | None = None
    calib_size: int = 1600
    batch_size: int = 16
    order: int = 4
    lr: float = 0.01
    gamma: float = 10.0
    adapter_bits: int | None = None
    per_channel: bool | None = None
    symmetric: bool | None = None
    clip: str | None = None
    k: float | None = None
    rounding: str | None = None
    svd: str | None = None
    stats: str | None = None
    stats_size: int = 512
    cov_rows: float = 4.0
    gptq_passes: int | None = None
    act_order: bool | None = None
    gptq_damp: float = 0.01
    clip_metric: str | None = None
    fit_classifier: bool = True
    augment: str | None = None
    distill: str | None = None
    features: str | None = None
    feature_weight: float = 1.0
    finetune_biases: bool = True
    selection: LayerSelection = field(default_factory=lambda: LayerSelection(keep=("first", "last", "depthwise")))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SettingsError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.finetune_iters > self.iters and PRESETS[self.preset]["finetune_iters"] == self.finetune_iters:
            object.__setattr__(self, "finetune_iters", self.iters // 2)  # --iters below the preset's fine-tuning
        check_bits(self.bits)
        if self.adapter_bits is None:  # 2-3-bit weights: 4-bit adapters, so the file shrinks with the grid
            object.__setattr__(self, "adapter_bits", 8 if self.bits >= 4 else 4)
        if not (isinstance(self.budget, (int, float)) and 0 <= self.budget <= 1):
            raise SettingsError(f"budget must be a fraction from 0 to 1 of the weight parameters, got {self.budget!r}")
        if not 0 <= int(self.iters) <= 100_000:
            raise SettingsError(f"iters must be from 0 to 100000, got {self.iters!r}")
        if not 0 <= int(self.finetune_iters) <= int(self.iters):
            raise SettingsError(f"finetune_iters must be from 0 to iters ({self.iters}), got {self.finetune_iters!r}")
        if int(self.calib_size) < 1 or int(self.batch_size) < 1 or int(self.stats_size) < 1:
            raise SettingsError("calib_size, batch_size and stats_size must be >= 1")
        if not (isinstance(self.cov_rows, (int, float)) and 0.1 <= self.cov_rows <= 1000):
            raise SettingsError(f"cov_rows must be from 0.1 to 1000 (input rows per layer, times K), got {self.cov_rows!r}")
        if not (isinstance(self.gptq_passes, int) and not isinstance(self.gptq_passes, bool)
                and 1 <= self.gptq_passes <= 64):
            raise SettingsError(f"gptq_passes must be an integer from 1 to 64, got {self.gptq_passes!r}")
        if not (isinstance(self.gptq_damp, (int, float)) and 0 < self.gptq_damp <= 100):
            raise SettingsError(f"gptq_damp must be > 0 and <= 100 (times the mean Hessian diagonal), got {self.gptq_damp!r}")
        if not isinstance(self.act_order, bool):
            raise SettingsError(f"act_order must be True or False, got {self.act_order!r}")
        if self.clip_metric == "input" and not self.per_channel:
            raise SettingsError("clip_metric input needs a per-channel grid (per_channel=True)")
        if not 1 <= int(self.order) <= 32:
            raise SettingsError(f"order (Butterworth) must be from 1 to 32, got {self.order!r}")
        if not (self.lr > 0 and self.gamma >= 0):
            raise SettingsError(f"lr must be > 0 and gamma >= 0, got lr={self.lr!r} gamma={self.gamma!r}")
        if self.adapter_bits not in (0, *range(2, 9)):
            raise SettingsError(f"adapter_bits must be 0 (float adapters) or 2-8, got {self.adapter_bits!r}")
        if self.clip not in CLIP_METHODS:
            raise SettingsError(f"clip must be one of {', '.join(CLIP_METHODS)}, got {self.clip!r}")
        if not (isinstance(self.feature_weight, (int, float)) and 0 < self.feature_weight <= 1000):
            raise SettingsError(f"feature_weight must be > 0 and <= 1000, got {self.feature_weight!r}")
        if not isinstance(self.finetune_biases, bool):
            raise SettingsError(f"finetune_biases must be True or False, got {self.finetune_biases!r}")
        for name, allowed in (("rounding", ROUNDINGS), ("svd", SVDS), ("stats", STATS), ("augment", AUGMENTS),
                              ("distill", DISTILLS), ("features", FEATURES),
                              ("clip_metric", CLIP_METRICS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        QuantSpec(bits=self.bits, clip=self.clip, k=self.k)  # validates k

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, per_channel=self.per_channel, symmetric=self.symmetric, clip=self.clip, k=self.k)

    @property
    def search_iters(self) -> int:
        return int(self.iters) - int(self.finetune_iters)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _parse_adapter_bits(text) -> int:
    return 0 if str(text).lower() in ("0", "float", "none") else int(text)


CORA_OPTIONS = (
    CliOption("--preset", "preset", tuple(PRESETS), "CoRa choices: the best measured combination, or the paper's "
              "reference (per-tensor std-clipped grid, plain residual SVD, no correction, no fine-tuning) [default]."),
    CliOption("--budget", "budget", float, "Adapter parameters as a fraction of the weight parameters [0.05]."),
    CliOption("--iters", "iters", int, "Optimization steps in all: rank search + adapter fine-tuning [default preset 100, reference 250]."),
    CliOption("--finetune-iters", "finetune_iters", int, "Steps of --iters spent fine-tuning adapters [default 40, reference 0]."),
    CliOption("--calib-size", "calib_size", int, "Calibration images used [1600]."),
    CliOption("--search-batch", "batch_size", int, "Images per optimization step [16]."),
    CliOption("--order", "order", int, "Butterworth filter order [4]."),
    CliOption("--adapter-bits", "adapter_bits", str, "Adapter weight bits (per-channel symmetric), or float [8; 4 with 2-3-bit weights].",
              convert=_parse_adapter_bits),
    CliOption("--rounding", "rounding", ROUNDINGS, "Weight rounding: nearest, or GPTQ error feedback [default gptq]."),
    CliOption("--svd", "svd", SVDS, "Residual decomposition: plain weight SVD, or in the metric of the layer "
              "inputs [default activation]."),
    CliOption("--fit-classifier/--no-fit-classifier", "fit_classifier", bool,
              "Let the statistics correction and the bias fine-tuning touch Linear (classifier) layers: their "
              "per-class corrections are fitted on the calibration images' classes [fit]."),
    CliOption("--augment", "augment", AUGMENTS, "Distillation images: as they are, random flips, random resized "
              "crops and flips, or crops and flips blended in pairs [default none]."),
    CliOption("--distill", "distill", DISTILLS, "Logit loss: KL toward the float softmax, or squared error of all "
              "the (centred) logits [default preset mse, reference kl]."),
    CliOption("--features", "features", FEATURES, "Also match every planned layer's output to the float network's "
              "(relative squared error) [default none]."),
    CliOption("--feature-weight", "feature_weight", float, "Weight of the --features loss [1.0]."),
    CliOption("--finetune-biases/--no-finetune-biases", "finetune_biases", bool,
              "Let the adapter fine-tuning train the layers' biases too [yes]."),
    CliOption("--stats-images", "stats_size", int, "Calibration images for the input statistics of GPTQ and the "
              "input-metric SVD (every output position, one K x K accumulator per layer) [512]."),
    CliOption("--cov-rows", "cov_rows", float, "Input rows per layer for those statistics, as a multiple of the "
              "layer's input width K (more positions are subsampled) [4]."),
    CliOption("--gptq-passes", "gptq_passes", int, "1: every layer's statistics from the float network; n: layers in "
              "n groups by depth, each from the network with the earlier groups quantized [default preset 1]."),
    CliOption("--gptq-damp", "gptq_damp", float, "GPTQ damping, times the mean Hessian diagonal [0.01]."),
    CliOption("--act-order/--no-act-order", "act_order", bool, "GPTQ rounds the columns by descending input "
              "energy [default preset yes, reference no]."),
    CliOption("--clip-metric", "clip_metric", CLIP_METRICS, "Grid range per channel: from --clip (weight error), or "
              "the one with the least layer-output error on the input statistics [default preset input, reference weight]."),
    CliOption("--stats", "stats", STATS, "Correct each layer's output statistics toward the float network: "
              "none, mean only, or mean and std [preset default: none]."),
)


def butterworth(c: torch.Tensor, full_rank: int, order: int) -> torch.Tensor:
    """T_i = 1 / sqrt(1 + ((i / R) / c)^(2n)) for i = 1..R: the normalized Butterworth low-pass."""
    i = torch.arange(1, full_rank + 1, dtype=torch.float32) / full_rank
    return torch.rsqrt(1 + (i / c).pow(2 * order))


class _Layer(nn.Module):
    """A planned layer during the search: conv/linear with weight gain * (W_q + B_T A_T) + bias."""

    def __init__(self, mod: nn.Module, wq: torch.Tensor, factors: tuple | None, order: int, init_c: float) -> None:
        super().__init__()
        self.is_conv = isinstance(mod, nn.Conv2d)
        self.conv_args = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups) \
            if self.is_conv else {}
        self.shape = tuple(mod.weight.shape)
        self.register_buffer("wq", wq.detach().reshape(self.shape[0], -1).clone())
        cout = self.shape[0]
        bias = mod.bias.detach().clone() if mod.bias is not None else torch.zeros(cout)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.register_buffer("gain", torch.ones(cout))
        self.order = order
        self.mode = "none"
        if factors is not None:
            u_s, v = factors  # (Cout, R) already scaled by S, and (R, K)
            self.register_buffer("us", u_s)
            self.register_buffer("v", v)
            self.full_rank = u_s.shape[1]
            self.c = nn.Parameter(torch.tensor(float(init_c)))
            self.mode = "soft"

    def delta(self) -> torch.Tensor | None:
        if self.mode == "soft":
            t2 = butterworth(self.c, self.full_rank, self.order).pow(2)
            return (self.us * t2) @ self.v
        if self.mode == "hard":
            return self.b @ self.a
        return None

    def set_hard(self, rank: int) -> None:
        """Fix the rank: trainable factors B = U_r S_r^(1/2), A = S_r^(1/2) V_r (no more cutoff)."""
        s = self.us[:, :rank].norm(dim=0).clamp_min(1e-30)
        self.b = nn.Parameter((self.us[:, :rank] / s.sqrt()).clone())
        self.a = nn.Parameter((self.v[:rank] * s.sqrt()[:, None]).clone())
        self.mode = "hard"

    def weight(self) -> torch.Tensor:
        w = self.wq
        d = self.delta()
        if d is not None:
            w = w + d
        return (w * self.gain[:, None]).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, self.weight(), self.bias, **self.conv_args)
        return F.linear(x, self.weight(), self.bias)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


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
                     settings: "CoraSettings", batches: list[torch.Tensor]) -> tuple[dict, dict]:
    """Phase 1-2: input statistics and each layer's grid (GPTQ when settings.rounding == "gptq") and
    residual factors (for the adapted layers). With gptq_passes > 1 the layers are taken by depth in
    that many groups, each group's statistics from a copy of the network whose earlier groups are
    already quantized. Returns ({name: QuantizedTensor}, {name: (U S, V) or None})."""
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

    for name in order:
        if name not in need_cov:
            quantize(name, None)
    cov_order = [n for n in order if n in need_cov]
    groups = [list(g) for g in np.array_split(np.array(cov_order, dtype=object), passes) if len(g)]
    for gi, group in enumerate(groups):
        t0 = time.perf_counter()
        rows = {n: math.ceil(settings.cov_rows * input_width(layers[n])) for n in group}
        acc = input_second_moments(work, {n: work_layers[n] for n in group}, batches, rows, seed=settings.seed + gi)
        t1 = time.perf_counter()
        for n in group:
            quantize(n, acc.pop(n).value())
        log.info("statistics group %d/%d (%d layers, %s rows): %.1f s, quantization %.1f s", gi + 1, len(groups),
                 len(group), "-".join(str(rows[n]) for n in (group[0], group[-1])), t1 - t0,
                 time.perf_counter() - t1)
    return grids, factors


@torch.no_grad()
def _correct_statistics(student: nn.Module, wrapped: dict[str, _Layer], target: dict, batch: torch.Tensor,
                        mode: str, skip: frozenset = frozenset()) -> None:
    """One forward pass in layer order; each layer's output is corrected (and the correction absorbed
    into its gain and bias) before the next layer sees it."""

    def hook(name):
        def fn(mod: _Layer, inputs, out):
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


def _quantize_adapter(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric grid: (dequantized values, scales)."""
    qt = quantize_weight(t, QuantSpec(bits=bits, per_channel=True, symmetric=True, clip="minmax"))
    return qt.dequantize().to(torch.float32), qt.scale.to(torch.float32)


def _quantize_layer(w: torch.Tensor, spec: QuantSpec, settings: "CoraSettings", cov: torch.Tensor | None,
                    decompose: bool) -> tuple[QuantizedTensor, tuple | None]:
    """The layer's grid (range from the input-weighted error when clip_metric == "input", GPTQ
    rounding when rounding == "gptq"; both need the input second moment cov) and, when decompose,
    the residual's factors (U S, V) with R = U S V, decomposed in the metric of the inputs when
    svd == "activation"."""
    if settings.clip_metric == "input" and cov is not None:
        qt = input_weighted_clip(w, spec, cov)
    else:
        qt = quantize_weight(w, spec)
    if settings.rounding == "gptq" and cov is not None:
        qt = gptq_round(w, qt, cov, damp=settings.gptq_damp, act_order=settings.act_order)
    if not decompose:
        return qt, None
    r = (w - qt.dequantize().to(torch.float32)).reshape(w.shape[0], -1)
    if settings.svd == "activation":
        h = cov.double()
        h = h + torch.eye(h.shape[0], dtype=h.dtype) * (0.01 * torch.diag(h).mean() + 1e-12)
        chol = torch.linalg.cholesky(h)  # H = C C^T
        u, s, vt = torch.linalg.svd(r.double() @ chol, full_matrices=False)
        v = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # V^T C^-1
    else:
        u, s, v = torch.linalg.svd(r.double(), full_matrices=False)
    return qt, ((u * s).float(), v.float())


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
    wrapped: dict[str, _Layer] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    per_rank: dict[str, int] = field(default_factory=dict)
    weight_frac: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    c_final: dict[str, float] = field(default_factory=dict)
    history: list = field(default_factory=list)
    objective: object = None


def _build_student(st: _Search, grids: dict, factors: dict) -> None:
    """The student: every planned layer a _Layer (grid + Butterworth-weighted residual), cutoffs
    started where the budget is met with equal fractions."""
    st.student = copy.deepcopy(st.teacher)
    for name in st.bits:
        f = factors[name]
        if f is not None:
            st.full[name] = f[1].shape[0]
            st.per_rank[name] = f[1].shape[1] + f[0].shape[0]
            st.weight_frac[name] = st.full[name] * st.per_rank[name] / st.total_params
        st.wrapped[name] = _Layer(st.layers[name], grids[name].dequantize().to(torch.float32), f, st.settings.order, 1.0)
    if st.adapted:
        start = min(1.0, st.settings.budget / max(sum(st.weight_frac.values()), 1e-12))
        for n in st.adapted:
            st.wrapped[n].c.data.fill_(max(start, 1.0 / st.full[n]))
    for name, w in st.wrapped.items():
        _set_module(st.student, name, w)
    st.student.eval()


def _make_objective(st: _Search, captures: list) -> None:
    """st.objective(): one batch's distillation loss of the student against the float network
    (teacher logits computed once unless augmentation or feature matching need them per step)."""
    s, calib, teacher = st.settings, st.calib, st.teacher
    per_step = s.augment != "none" or s.features != "none"
    t0 = time.perf_counter()
    with torch.no_grad():
        teacher_logits = None if per_step else torch.cat([teacher(x) for x in calib.batches(64)])
    log.info("teacher logits on %d images %.1f s", 0 if per_step else len(calib), time.perf_counter() - t0)
    gen = torch.Generator().manual_seed(s.seed)
    feature_names = dict(st.wrapped) if s.features == "layers" else {}
    t_capture = Capture({n: st.layers[n] for n in feature_names})
    s_capture = Capture(feature_names)
    captures += [t_capture, s_capture]

    def objective() -> torch.Tensor:
        idx = torch.randint(len(calib), (s.batch_size,), generator=gen)
        x = calib.preprocess.normalize(calib.images[idx])
        if per_step:
            x = augment_batch(x, s.augment, gen)
            with torch.no_grad():
                t = teacher(x)
            t_feats = t_capture.take()
        else:
            t, t_feats = teacher_logits[idx], {}
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
             s.search_iters, s.batch_size, s.budget, st.total_params)
    for it in range(s.search_iters):
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
    for name, w in st.wrapped.items():
        if name in fixed or not s.finetune_biases:
            continue
        w.bias.requires_grad_(True)
        params.append({"params": [w.bias], "lr": 1e-3 * float(w.bias.detach().pow(2).mean().sqrt()) + 1e-6})
    opt = torch.optim.Adam(params)
    log.info("fine-tuning %d adapters and %d biases: %d steps", len(live), len(params) - 2 * len(live),
             s.finetune_iters)
    used = float(sum(st.ranks[n] * st.per_rank[n] for n in live) / st.total_params)
    for it in range(s.finetune_iters):
        kd = st.objective()
        opt.zero_grad()
        kd.backward()
        opt.step()
        st.history.append((float(kd.detach()), used))
        if it % 25 == 0 or it == s.finetune_iters - 1:
            log.info("fine-tune %d/%d: distillation loss %.4f", it + 1, s.finetune_iters, float(kd.detach()))


def _build_plan(st: _Search, grids: dict, live: list[str], seconds: float) -> Plan:
    """The Plan: each layer's grid (gains absorbed into the scales), adapter factors (quantized to
    adapter_bits) and bias when changed; the search's figures in meta["cora"]."""
    s = st.settings
    plans = []
    adapter_params = 0
    for name in st.bits:
        w = st.wrapped[name]
        qt = grids[name]
        gain = w.gain.detach()
        if not torch.allclose(gain, torch.ones_like(gain)):
            scale = (qt.scale.expand(gain.shape[0]) if not s.per_channel else qt.scale) * gain
            zp = qt.zero_point.expand(gain.shape[0]) if not s.per_channel else qt.zero_point
            qt = dataclasses.replace(qt, scale=scale.contiguous(), zero_point=zp.contiguous(),
                                     spec=dataclasses.replace(qt.spec, per_channel=True))
        adapter = None
        if w.mode == "hard":
            a = w.a.detach().reshape((w.a.shape[0],) + w.shape[1:])
            bmat = (w.b.detach() * gain[:, None]).reshape(w.shape[0], -1, 1, 1)
            a_scale = b_scale = None
            if s.adapter_bits:
                a, a_scale = _quantize_adapter(a, s.adapter_bits)
                bmat, b_scale = _quantize_adapter(bmat, s.adapter_bits)
            adapter = LowRankAdapter(rank=int(a.shape[0]), a=a.numpy().astype(np.float32),
                                     b=bmat.numpy().astype(np.float32), bits=s.adapter_bits or None,
                                     a_scale=None if a_scale is None else a_scale.numpy(),
                                     b_scale=None if b_scale is None else b_scale.numpy())
            adapter_params += adapter.params
        info = {"rank": st.ranks.get(name, 0), "full_rank": st.full.get(name, 0)}
        if name in st.c_final:
            info["cutoff"] = st.c_final[name]
        bias = w.bias.detach().numpy().astype(np.float32)
        orig_bias = st.layers[name].bias
        changed = orig_bias is None or not np.array_equal(bias, orig_bias.detach().numpy())
        plans.append(LayerPlan(name=name, kind=layer_kind(st.layers[name]), shape=tuple(w.shape),
                               uniform=uniform_from(qt), adapter=adapter, bias=Bias(bias) if changed else None,
                               info=info))
    meta = {"cora": {"iterations": len(st.history), "search_iterations": s.search_iters if st.adapted else 0,
                     "finetune_iterations": s.finetune_iters if live else 0,
                     "adapter_params": adapter_params, "weight_params": st.total_params,
                     "adapter_fraction": adapter_params / st.total_params, "budget": s.budget,
                     "ranks": {n: st.ranks[n] for n in st.adapted}, "search_seconds": seconds,
                     "loss_history": [round(h[0], 5) for h in st.history]}}
    log.info("CoRa done in %.1f s: adapters %d parameters (%.2f%% of %d), %d steps", seconds, adapter_params,
             100 * adapter_params / st.total_params, st.total_params, len(st.history))
    return Plan(method="cora", settings={"method": "cora", **s.to_json()}, layers=tuple(plans), meta=meta)


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
    adapted = [n for n, b in bits.items() if b == settings.bits and b < 8 and settings.budget > 0
               and isinstance(layers[n], nn.Conv2d) and layers[n].groups == 1]
    calib = as_torch(calib).subset(settings.calib_size, settings.seed)
    st = _Search(settings, teacher, layers, bits, adapted, calib, sum(m.weight.numel() for m in layers.values()))
    stats_batches = list(calib.subset(settings.stats_size, settings.seed + 1).batches(32))
    log.info("CoRa: %d layers, %d with adapters; statistics on %d images", len(bits), len(adapted),
             sum(len(b) for b in stats_batches))
    t0 = time.perf_counter()
    float_stats = _float_statistics(teacher, layers, stats_batches) if settings.stats != "none" else {}
    grids, factors = _quantize_layers(teacher, layers, bits, adapted, settings, stats_batches)
    log.info("statistics, quantization (%s rounding) and residual decomposition (%s): %.1f s", settings.rounding,
             settings.svd, time.perf_counter() - t0)
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


def _reset_biases(wrapped: dict[str, _Layer], layers: dict[str, nn.Module]) -> None:
    with torch.no_grad():
        for n, w in wrapped.items():
            b = layers[n].bias
            w.bias.data = b.detach().clone() if b is not None else torch.zeros_like(w.bias)


def cora_report(plan: Plan) -> dict:
    """The report's `cora` section."""
    return {"cora": dict(plan.meta.get("cora", {}))}
