"""CoRa's settings: the presets, the choice tuples, `CoraSettings` (validated) and the CLI options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cora_onnx.core.errors import SettingsError, check_bits
from cora_onnx.torch.quantizers import CLIP_METHODS, QuantSpec, check_group
from cora_onnx.torch.search.layers import LayerSelection
from cora_onnx.torch.search.cli_options import CliOption
from cora_onnx.torch.search.distill import AUGMENTS, DISTILLS
from cora_onnx.torch.search.cora.mixed import check_mixed_bits, parse_mixed_bits

PRESETS: dict[str, dict] = {
    # the paper / reference implementation
    "reference": dict(per_channel=False, symmetric=False, clip="std", k=3.0, rounding="nearest", svd="weight",
                      stats="none", iters=250, finetune_iters=0, augment="none", distill="kl", features="none",
                      gptq_passes=1, act_order=False, clip_metric="weight", mixed_bits=(), group_size=0),
    # the best combination measured here (see tools/measure_cora.py and docs/results/cora.md: the statistics
    # correction helped in the light ablation but lost 0.4-2.2 points in the full runs, in-class and
    # on held-out classes; act-order, the output-error clip and the logit MSE won on the many-class
    # protocol, the sequential passes did not, issue 14)
    "default": dict(per_channel=True, symmetric=True, clip="mse", k=3.0, rounding="gptq", svd="activation",
                    stats="none", iters=100, finetune_iters=40, augment="none", distill="mse", features="none",
                    gptq_passes=1, act_order=True, clip_metric="input", mixed_bits=(2, 3, 4, 8), group_size=64),
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
    adapters after the ranks are fixed; calib_size: calibration images used; search_batch: images per step; order: Butterworth
    order n; lr: Adam step on the cutoffs; gamma: weight of the budget penalty; adapter_bits:
    2-8 (per-channel symmetric) or 0 for float adapters; None: 8, or 4 with 2-3-bit weights (their
    file then shrinks with the grid: 8-bit adapters at 5% of the weights cost 0.4 bit per weight); preset: "default" or "reference" (fills
    every grid/rounding/svd/stats/finetune setting left as None); fit_classifier: False keeps Linear
    layers out of the statistics correction and the bias fine-tuning.

    Input statistics for GPTQ and the input-metric SVD (cora_onnx.torch.search.stats): stats_size:
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
    the biases (False: adapter factors only). finetune_gains: let it train each output channel's
    gain too (one number per channel, absorbed into the grid's scale and the adapter at export).

    group_size: 0 (one scale per output channel; the reference preset), or one float16 scale per
    group of that many consecutive weights of an output channel (quantizers.QuantSpec.group) for
    every grid below 8 bits (64 in the default preset, unless per_channel, symmetric, stats or
    finetune_gains are set so that groups cannot apply): the output-error clip chooses each group's
    range, GPTQ rounds on the fixed groups. The scales cost 16 / group_size bits per weight,
    counted in the per-layer widths' bytes.

    Per-layer widths (cora_onnx.torch.search.cora.mixed): mixed_bits: the widths each layer planned at
    `bits` may take instead ((2, 3, 4, 8) in the default preset); () keeps every layer at `bits` (the
    reference preset). The widths are
    chosen to cost no more stored bytes than uniform `bits` (2-4-bit grids take their bits, 5-8-bit
    ones 8), least summed KL(float || quantized) on sens_images calibration images, each layer's KL
    measured alone at each width (below 8 bits). mixed_budget: those bytes as stored bits per weight
    of the layers that take part instead (None: the bits of uniform `bits`; e.g. 2.3 lets a W2 model
    spend 0.3 bits per weight more). Adapters go to every convolution below 8 bits, under the same
    `budget`."""

    bits: int = 4
    preset: str = "default"
    budget: float = 0.05
    iters: int | None = None
    finetune_iters: int | None = None
    calib_size: int = 1600
    search_batch: int = 16
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
    finetune_gains: bool = False
    mixed_bits: tuple[int, ...] | str | None = None
    mixed_budget: float | None = None
    sens_images: int = 32
    group_size: int | None = None
    selection: LayerSelection = field(default_factory=lambda: LayerSelection(keep=("first", "last", "depthwise")))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SettingsError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.group_size is None and (self.per_channel is False or self.symmetric is False or self.finetune_gains
                                        or self.stats not in (None, "none")):
            object.__setattr__(self, "group_size", 0)  # the preset's groups need a grid and gains they can take
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.finetune_iters > self.iters and PRESETS[self.preset]["finetune_iters"] == self.finetune_iters:
            object.__setattr__(self, "finetune_iters", self.iters // 2)  # --iters below the preset's fine-tuning
        check_bits(self.bits)
        object.__setattr__(self, "mixed_bits", parse_mixed_bits(self.mixed_bits))
        check_mixed_bits(self.mixed_bits, self.bits, self.mixed_budget)
        if self.mixed_bits and self.gptq_passes != 1:
            raise SettingsError("mixed bits take every layer's statistics from the float network: use gptq_passes 1, "
                                "or mixed bits none (--mixed-bits none) for sequential GPTQ")
        if not (isinstance(self.sens_images, int) and 1 <= self.sens_images <= 10_000):
            raise SettingsError(f"sens_images must be an integer from 1 to 10000, got {self.sens_images!r}")
        if self.adapter_bits is None:  # 2-3-bit weights: 4-bit adapters, so the file shrinks with the grid
            object.__setattr__(self, "adapter_bits", 8 if self.bits >= 4 else 4)
        if not (isinstance(self.budget, (int, float)) and 0 <= self.budget <= 1):
            raise SettingsError(f"budget must be a fraction from 0 to 1 of the weight parameters, got {self.budget!r}")
        if not 0 <= int(self.iters) <= 100_000:
            raise SettingsError(f"iters must be from 0 to 100000, got {self.iters!r}")
        if not 0 <= int(self.finetune_iters) <= int(self.iters):
            raise SettingsError(f"finetune_iters must be from 0 to iters ({self.iters}), got {self.finetune_iters!r}")
        if int(self.calib_size) < 1 or int(self.search_batch) < 1 or int(self.stats_size) < 1:
            raise SettingsError("calib_size, search_batch and stats_size must be >= 1")
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
        if not isinstance(self.finetune_gains, bool):
            raise SettingsError(f"finetune_gains must be True or False, got {self.finetune_gains!r}")
        for name, allowed in (("rounding", ROUNDINGS), ("svd", SVDS), ("stats", STATS), ("augment", AUGMENTS),
                              ("distill", DISTILLS), ("features", FEATURES),
                              ("clip_metric", CLIP_METRICS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        QuantSpec(bits=self.bits, clip=self.clip, k=self.k)  # validates k
        check_group(self.group_size)
        if self.group_size and not (self.per_channel and self.symmetric):
            raise SettingsError("group-wise scales (group_size) need a per-channel symmetric grid")
        if self.group_size and (self.finetune_gains or self.stats != "none"):
            raise SettingsError("group-wise scales (group_size) take no per-channel gains: use them without "
                                "finetune_gains and with stats none")

    def spec(self, bits: int) -> QuantSpec:
        """The grid of a layer at `bits`: group-wise scales (group_size) below 8 bits only."""
        return QuantSpec(bits=bits, per_channel=self.per_channel, symmetric=self.symmetric, clip=self.clip, k=self.k,
                         group=self.group_size if bits < 8 else 0)

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
    CliOption("--search-batch", "search_batch", int, "Images per optimization step [16]."),
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
    CliOption("--finetune-gains/--no-finetune-gains", "finetune_gains", bool,
              "Let the adapter fine-tuning train a gain per output channel (absorbed into the grid scales) [no]."),
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
    CliOption("--mixed-bits", "mixed_bits", str, "Per-layer weight widths: each layer takes one, chosen by measured "
              "sensitivity so the weights cost no more bytes than uniform --bits; none: every layer at --bits "
              "[default preset 2,3,4,8, reference none].",
              convert=parse_mixed_bits),
    CliOption("--mixed-budget", "mixed_budget", float, "Bytes for the --mixed-bits widths, in stored bits per "
              "weight of the layers that take part (2-4-bit grids store their bits, 5-8-bit ones 8) [the bits of "
              "uniform --bits]."),
    CliOption("--group-size", "group_size", int, "One weight scale per this many consecutive weights of an output "
              "channel (float16 scales, blocked DequantizeLinear, opset 21) for the grids below 8 bits; 0: one "
              "scale per output channel [default preset 64, reference 0]."),
    CliOption("--sens-images", "sens_images", int, "Calibration images for the --mixed-bits sensitivity [32]."),
    CliOption("--stats", "stats", STATS, "Correct each layer's output statistics toward the float network: "
              "none, mean only, or mean and std [preset default: none]."),
)
