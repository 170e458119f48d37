"""CoRa (Luo et al., BMVC 2024): low-bit weights plus low-rank convolutional adapters that reclaim
the quantization residual, with ranks searched by a differentiable Butterworth cutoff per layer.

The search is cheap: a layer's Butterworth-weighted correction is folded into its conv weight in
the forward pass (W_q + B diag(T(c)^2) A, one conv per layer) instead of running two extra
full-rank convolutions, and only the cutoffs c_l are trained. Beyond the paper (the `default`
preset; `reference` reproduces the paper's choices):

- grid: per-channel symmetric with an MSE-searched range instead of per-tensor mean +/- k std;
- rounding: error-feedback (GPTQ) rounding on the layer's input statistics instead of nearest;
- residual: decomposed in the metric of the layer's inputs (SVD of R C with C C^T the input
  second moment), so the top singular directions are those that matter for the layer *output*;
- statistics: each quantized layer's output is corrected toward the float network's per-channel
  mean and std (folded into the per-channel scales and the bias), instead of BatchNorm
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
    # on held-out classes)
    "default": dict(per_channel=True, symmetric=True, clip="mse", k=3.0, rounding="gptq", svd="activation",
                    stats="none", iters=100, finetune_iters=40, augment="none", distill="kl", features="none",
                    gptq_passes=1, act_order=False, clip_metric="weight"),
}
ROUNDINGS = ("nearest", "gptq")
SVDS = ("weight", "activation")
STATS = ("none", "mean", "float")
AUGMENTS = ("none", "flip", "crop", "mix")
DISTILLS = ("kl", "mse")
FEATURES = ("none", "layers")
CLIP_METRICS = ("weight", "input")


@dataclass(frozen=True)
class CoraSettings:
    """bits: weight bits (2-8); budget: adapter parameters as a fraction of the model's Conv/Linear
    weight parameters; iters: total optimization steps (rank search + fine-tuning): 250 for the
    reference preset, 100 for the default one; finetune_iters: steps of those spent fine-tuning
    adapters after the ranks are fixed; calib_size: calibration images used; batch_size: images per step; order: Butterworth
    order n; lr: Adam step on the cutoffs; gamma: weight of the budget penalty; adapter_bits:
    8 (per-channel symmetric) or 0 for float adapters; preset: "default" or "reference" (fills
    every grid/rounding/svd/stats/finetune setting left as None); fit_classifier: False keeps Linear
    layers out of the statistics correction and the bias fine-tuning.

    Input statistics for GPTQ and the input-metric SVD (cora_onnx.search.stats): stats_size:
    calibration images they are taken from (every output position, streamed into one K x K float64
    accumulator per layer); cov_rows: input rows kept per layer, as a multiple of its input width K
    (output positions beyond that are subsampled; a layer with fewer positions keeps all of them:
    ResNet-18's layer4 has K = 4,608 and 49 positions per image, so 4 x K rows need 377 images);
    gptq_passes: 1 takes every layer's statistics from the float network; n > 1 splits the layers by
    depth into n groups and takes each group's statistics from the network whose earlier groups are
    already quantized (sequential GPTQ: later layers absorb the earlier layers' error); act_order:
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
    adapter_bits: int = 8
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
    CliOption("--adapter-bits", "adapter_bits", str, "Adapter weight bits (per-channel symmetric), or float [8].",
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
              "the (centred) logits [default kl]."),
    CliOption("--features", "features", FEATURES, "Also match every planned layer's output to the float network's "
              "(relative squared error) [default none]."),
    CliOption("--feature-weight", "feature_weight", float, "Weight of the --features loss [1.0]."),
    CliOption("--finetune-biases/--no-finetune-biases", "finetune_biases", bool,
              "Let the adapter fine-tuning train the layers' biases too [yes]."),
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
    """One forward pass in layer order; each layer's output is corrected (and the correction folded
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


def _kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's log-softmax against the teacher's softmax."""
    return -(F.softmax(teacher_logits, 1) * F.log_softmax(student_logits, 1)).sum(1).mean()


def _logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the logits, each row centred (softmax ignores a shared shift)."""
    s = student_logits - student_logits.mean(1, keepdim=True)
    t = teacher_logits - teacher_logits.mean(1, keepdim=True)
    return (s - t).pow(2).mean()


def _feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of each output's squared error relative to the float output's power."""
    terms = [(student[n] - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12) for n, t in teacher.items()]
    return torch.stack(terms).mean()


class _Capture:
    """Forward hooks that keep the latest output of each named module."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def fn(mod, inputs, out):
            self.out[name] = out
        return fn

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a normalized N x 3 x H x W batch (see CoraSettings.augment); deterministic under gen."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    if mode in ("crop", "mix"):
        out = []
        for img in x:
            u = torch.rand(4, generator=gen).tolist()
            area = h * w * (0.25 + 0.75 * u[0])
            ratio = math.exp(math.log(3 / 4) + u[1] * math.log(16 / 9))
            ch = max(1, min(h, round(math.sqrt(area / ratio))))
            cw = max(1, min(w, round(math.sqrt(area * ratio))))
            top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
            out.append(F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                                     align_corners=False))
        x = torch.cat(out)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mode == "mix" and n > 1:
        lam = torch.rand(n, 1, 1, 1, generator=gen)
        x = lam * x + (1 - lam) * x.roll(1, 0)
    return x


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
        qt = gptq_round(w, qt, cov, act_order=settings.act_order)
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


def search_cora(model: nn.Module, settings: CoraSettings, calib) -> Plan:
    """Quantize every selected layer, search adapter ranks under the budget, fine-tune, and plan."""
    if calib is None or len(calib) == 0:
        raise DataError("CoRa needs calibration images")
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = quantizable_layers(teacher)
    bits = select_layers(layers, settings.bits, settings.selection)
    total_params = sum(m.weight.numel() for m in layers.values())
    adapted = [n for n, b in bits.items() if b == settings.bits and b < 8 and settings.budget > 0
               and isinstance(layers[n], nn.Conv2d) and layers[n].groups == 1]
    calib = as_torch(calib).subset(settings.calib_size, settings.seed)
    stats_set = calib.subset(settings.stats_size, settings.seed + 1)
    stats_batches = list(stats_set.batches(32))
    log.info("CoRa: %d layers, %d with adapters; statistics on %d images", len(bits), len(adapted), len(stats_set))
    t0 = time.perf_counter()
    float_stats = _float_statistics(teacher, layers, stats_batches) if settings.stats != "none" else {}
    grids, factors = _quantize_layers(teacher, layers, bits, adapted, settings, stats_batches)
    log.info("statistics, quantization (%s rounding) and residual decomposition (%s): %.1f s", settings.rounding,
             settings.svd, time.perf_counter() - t0)
    t1 = time.perf_counter()
    per_step = settings.augment != "none" or settings.features != "none"  # float outputs at every step
    with torch.no_grad():
        teacher_logits = None if per_step else torch.cat([teacher(x) for x in calib.batches(64)])
    log.info("teacher logits on %d images %.1f s", 0 if per_step else len(calib), time.perf_counter() - t1)

    student = copy.deepcopy(teacher)
    wrapped: dict[str, _Layer] = {}
    full, per_rank, weight_frac = {}, {}, {}
    for name in bits:
        wq = grids[name].dequantize().to(torch.float32)
        f = factors[name]
        if f is not None:
            full[name] = f[1].shape[0]
            per_rank[name] = f[1].shape[1] + f[0].shape[0]
            weight_frac[name] = full[name] * per_rank[name] / total_params
        wrapped[name] = _Layer(layers[name], wq, f, settings.order, 1.0)
    if adapted:
        start = min(1.0, settings.budget / max(sum(weight_frac.values()), 1e-12))
        for n in adapted:
            wrapped[n].c.data.fill_(max(start, 1.0 / full[n]))
    for name, w in wrapped.items():
        _set_module(student, name, w)
    student.eval()

    gen = torch.Generator().manual_seed(settings.seed)

    feature_names = dict(wrapped) if settings.features == "layers" else {}
    t_capture = _Capture({n: layers[n] for n in feature_names})
    s_capture = _Capture(feature_names)

    def objective() -> torch.Tensor:
        """One batch: the distillation loss of the student against the float network."""
        idx = torch.randint(len(calib), (settings.batch_size,), generator=gen)
        x = calib.preprocess.normalize(calib.images[idx])
        if per_step:
            x = augment_batch(x, settings.augment, gen)
            with torch.no_grad():
                t = teacher(x)
            t_feats = t_capture.take()
        else:
            t, t_feats = teacher_logits[idx], {}
        out = student(x)
        loss = _kd_loss(out, t) if settings.distill == "kl" else _logit_mse(out, t)
        s_feats = s_capture.take()
        if t_feats:
            loss = loss + settings.feature_weight * _feature_loss(s_feats, t_feats)
        return loss

    # Linear layers (the classifier): per-class corrections, left alone unless fit_classifier
    fixed = frozenset() if settings.fit_classifier else frozenset(n for n in wrapped if isinstance(layers[n], nn.Linear))
    if settings.stats != "none":
        _correct_statistics(student, wrapped, float_stats, torch.cat(stats_batches[:4]), settings.stats, fixed)

    # rank search: only the cutoffs are trained
    cs = [wrapped[n].c for n in adapted]
    fracs = torch.tensor([weight_frac[n] for n in adapted])
    history = []
    if adapted and settings.search_iters > 0:
        opt = torch.optim.Adam(cs, lr=settings.lr)
        lo = torch.tensor([1.0 / full[n] for n in adapted])
        log.info("rank search: %d steps of %d images, budget %.3f of %d weight parameters",
                 settings.search_iters, settings.batch_size, settings.budget, total_params)
        for it in range(settings.search_iters):
            c_vec = torch.stack(cs)
            used = (c_vec * fracs).sum()
            kd = objective()
            loss = kd + settings.gamma * torch.exp(F.relu(used - settings.budget))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(cs, 1.0)
            opt.step()
            with torch.no_grad():
                c_new = torch.minimum(torch.maximum(torch.stack(cs), lo), torch.ones_like(lo))
                for p, v in zip(cs, c_new):
                    p.fill_(v)
            history.append((float(kd.detach()), float(used.detach())))
            if it % 25 == 0 or it == settings.search_iters - 1:
                ranks_now = [math.ceil(float(p.detach()) * full[n]) for p, n in zip(cs, adapted)]
                log.info("search %d/%d: distillation loss %.4f, budget used %.4f/%.4f, ranks %d-%d (median %d)",
                         it + 1, settings.search_iters, float(kd.detach()), float(used.detach()), settings.budget,
                         min(ranks_now), max(ranks_now), int(np.median(ranks_now)))

    # fix the ranks under the budget
    allowed = settings.budget * total_params
    c_final = {n: float(wrapped[n].c.detach()) for n in adapted}
    ranks = _project_ranks(c_final, full, per_rank, allowed) if adapted else {}
    for n in adapted:
        if ranks[n] > 0:
            wrapped[n].set_hard(ranks[n])
        else:
            wrapped[n].mode = "none"
    live = [n for n in adapted if ranks.get(n, 0) > 0]
    if settings.stats != "none":
        with torch.no_grad():  # re-estimate from the gain/bias state before the soft correction
            for w in wrapped.values():
                w.gain.fill_(1.0)
        _reset_biases(wrapped, layers)
        _correct_statistics(student, wrapped, float_stats, torch.cat(stats_batches[:4]), settings.stats, fixed)

    # fine-tune adapter factors and biases by distillation
    if settings.finetune_iters > 0 and live:
        params = []
        for n in live:
            for p in (wrapped[n].a, wrapped[n].b):
                params.append({"params": [p], "lr": 1e-3 * float(p.detach().pow(2).mean().sqrt()) + 1e-12})
        for name, w in wrapped.items():
            if name in fixed or not settings.finetune_biases:
                continue
            w.bias.requires_grad_(True)
            params.append({"params": [w.bias], "lr": 1e-3 * float(w.bias.detach().pow(2).mean().sqrt()) + 1e-6})
        opt = torch.optim.Adam(params)
        log.info("fine-tuning %d adapters and %d biases: %d steps", len(live), len(params) - 2 * len(live),
                 settings.finetune_iters)
        for it in range(settings.finetune_iters):
            kd = objective()
            opt.zero_grad()
            kd.backward()
            opt.step()
            history.append((float(kd.detach()), float(sum(ranks[n] * per_rank[n] for n in live) / total_params)))
            if it % 25 == 0 or it == settings.finetune_iters - 1:
                log.info("fine-tune %d/%d: distillation loss %.4f", it + 1, settings.finetune_iters, float(kd.detach()))

    t_capture.remove()
    s_capture.remove()

    # the plan
    plans = []
    adapter_params = 0
    for name, b in bits.items():
        w = wrapped[name]
        qt = grids[name]
        gain = w.gain.detach()
        if not torch.allclose(gain, torch.ones_like(gain)):
            scale = (qt.scale.expand(gain.shape[0]) if not settings.per_channel else qt.scale) * gain
            zp = qt.zero_point.expand(gain.shape[0]) if not settings.per_channel else qt.zero_point
            qt = dataclasses.replace(qt, scale=scale.contiguous(), zero_point=zp.contiguous(),
                                     spec=dataclasses.replace(qt.spec, per_channel=True))
        adapter = None
        if w.mode == "hard":
            a = w.a.detach().reshape((w.a.shape[0],) + w.shape[1:])
            bmat = (w.b.detach() * gain[:, None]).reshape(w.shape[0], -1, 1, 1)
            a_scale = b_scale = None
            if settings.adapter_bits:
                a, a_scale = _quantize_adapter(a, settings.adapter_bits)
                bmat, b_scale = _quantize_adapter(bmat, settings.adapter_bits)
            adapter = LowRankAdapter(rank=int(a.shape[0]), a=a.numpy().astype(np.float32),
                                     b=bmat.numpy().astype(np.float32), bits=settings.adapter_bits or None,
                                     a_scale=None if a_scale is None else a_scale.numpy(),
                                     b_scale=None if b_scale is None else b_scale.numpy())
            adapter_params += adapter.params
        info = {"rank": ranks.get(name, 0), "full_rank": full.get(name, 0)}
        if name in c_final:
            info["cutoff"] = c_final[name]
        bias = w.bias.detach().numpy().astype(np.float32)
        orig_bias = layers[name].bias
        changed = orig_bias is None or not np.array_equal(bias, orig_bias.detach().numpy())
        plans.append(LayerPlan(name=name, kind=layer_kind(layers[name]), shape=tuple(w.shape),
                               uniform=uniform_from(qt), adapter=adapter, bias=Bias(bias) if changed else None,
                               info=info))
    seconds = time.perf_counter() - t_start
    meta = {"cora": {"iterations": len(history), "search_iterations": settings.search_iters if adapted else 0,
                     "finetune_iterations": settings.finetune_iters if live else 0,
                     "adapter_params": adapter_params, "weight_params": total_params,
                     "adapter_fraction": adapter_params / total_params, "budget": settings.budget,
                     "ranks": {n: ranks[n] for n in adapted}, "search_seconds": seconds,
                     "loss_history": [round(h[0], 5) for h in history]}}
    log.info("CoRa done in %.1f s: adapters %d parameters (%.2f%% of %d), %d steps", seconds, adapter_params,
             100 * adapter_params / total_params, total_params, len(history))
    return Plan(method="cora", settings={"method": "cora", **settings.to_json()}, layers=tuple(plans), meta=meta)


def _reset_biases(wrapped: dict[str, _Layer], layers: dict[str, nn.Module]) -> None:
    with torch.no_grad():
        for n, w in wrapped.items():
            b = layers[n].bias
            w.bias.data = b.detach().clone() if b is not None else torch.zeros_like(w.bias)


def cora_report(plan: Plan) -> dict:
    """The report's `cora` section."""
    return {"cora": dict(plan.meta.get("cora", {}))}
