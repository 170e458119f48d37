"""PQ settings: block-size presets and overrides, the validated PqSettings, the CLI options."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from torch import nn

from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.search.distill import AUGMENTS, DISTILLS  # the same choices as CoRa's distillation
from cora_onnx.torch.search.layers import LayerSelection, is_depthwise
from cora_onnx.torch.search.cli_options import CliOption

__all__ = ["PqSettings", "block_kind", "parse_block_size", "PQ_OPTIONS", "BLOCK_PRESETS", "TARGETS", "DAMPING"]

BLOCK_PRESETS = ("small", "large")
TARGETS = ("weight", "float")

_FIXED_KINDS = ("1x1", "kxk", "depthwise", "linear")
CHUNK = 1 << 22  # elements per chunk of the n x k distance matrix / of unfolded inputs
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
    (uint8 codes). em_iters: EM iterations per layer. search_batch: images per batch of the
    statistics and per fine-tuning step. cache_bytes: the most bytes of cached stage inputs the
    statistics keep (search.staged.LayerFeed; None: 4 GiB or a quarter of the RAM; 0: a forward
    pass from the image per layer). finetune_steps / finetune_lr: distillation fine-tuning (Adam)
    of codewords, channel scales and biases; 0 steps skips it;
    finetune_biases=False keeps the (corrected) biases fixed, finetune_last=False keeps the last
    product-quantized layer (the classifier) fixed: both can carry the class prior of the
    calibration images into the model; finetune_scales=False keeps the channel scales fixed (all
    three off: only the codewords move, as in the paper). distill: "kl" (soft cross-entropy to
    the float softmax) or "mse" (centred logits: every class counts, not only the few the
    calibration images show); augment: "none", "flip", "crop" or "mix" (CoRa's augmentations:
    random flips, random resized crops and flips, crops blended in pairs; the teacher's logits
    are recomputed on each augmented batch).
    calib_size: calibration images used (fine-tuning); stats_size: a subset of them used for each
    layer's input statistics and the float output means of the bias correction (one forward per
    layer: the search's main cost); stats_patches: when > 0, a layer's statistics use more images
    (up to all calib_size) until it sees stats_patches patches per input it has, streamed batch by
    batch (memory K x K per layer, whatever the number of images). channel_scale: a float16
    scale per output channel; bias_correction: match each layer's output mean to the float
    network's. error_feedback: after the EM, assign the codes block by block over the filter,
    each block's error compensated in the blocks not yet assigned (GPTQ-style, with the full
    input covariance, which the EM's block-diagonal objective ignores). damping: the EM's ridge
    (see `fit_codebook`), relative to the layer's mean input energy. target: what each layer's
    quantized weight W^ is fitted to on the partially quantized network's inputs X_q: "weight",
    the layer's own float weight (min ||X_q W - X_q W^||^2; errors of earlier layers pass through
    uncorrected), or "float", the float network's output of the layer (min ||X_f W - X_q W^||^2:
    PQ of the target W* = H_qq^-1 H_qf W under the metric H_qq, see `float_target`). seed: initialization and batch order. selection: layers kept on a uniform grid at
    keep_bits (first / last / depthwise) or left in float (skip); uniform_layers: layer-name
    patterns (fnmatch) also kept on the uniform grid at selection.keep_bits; every other
    Conv/Linear is product-quantized; an entry 'PATTERN:BITS' sets those layers' bits instead.
    uniform_rounding: how the uniform_layers are rounded onto their grid, "nearest" or "gptq"
    (error-feedback rounding, `quantizers.gptq_round`, of the layer's target, see `target`, on
    the partially quantized network's input statistics, with the bias correction; layers with
    groups > 1 are rounded to nearest). uniform_clip: the range of a GPTQ-rounded uniform layer's
    per-channel grid, "weight" (the clip minimizing the squared weight error, `QuantSpec` clip
    "mse") or "input" (the clip minimizing the layer-output error of nearest rounding under the
    layer's input statistics, `quantizers.input_weighted_clip`, as CoRa's default);
    uniform_act_order: GPTQ rounds those layers' columns by descending input energy (CoRa's
    default; no effect with uniform_rounding "nearest"). weight_target_layers: layer-name patterns (fnmatch) fitted
    to their own float weight whatever `target` says (the classifier, whose float target
    W* = H_qq^-1 H_qf W, from ten calibration classes, overfits them)."""

    bits: int | None = None
    blocks: str = "small"
    block_size: Any = ()
    codewords: int = 256
    em_iters: int = 20
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    search_batch: int = 32
    calib_size: int = 256
    stats_size: int = 64
    stats_patches: int = 0
    cache_bytes: int | None = None
    channel_scale: bool = True
    bias_correction: bool = True
    error_feedback: bool = True
    finetune_biases: bool = True
    finetune_last: bool = True
    finetune_scales: bool = True
    distill: str = "kl"
    augment: str = "none"
    uniform_layers: Any = ()
    damping: float = DAMPING
    target: str = "float"
    weight_target_layers: Any = ()
    uniform_rounding: str = "nearest"
    uniform_clip: str = "weight"
    uniform_act_order: bool = False
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
        _int("search_batch", 1)
        _int("calib_size", 1)
        _int("stats_size", 1)
        _int("stats_patches", 0)
        if self.cache_bytes is not None:
            _int("cache_bytes", 0)
        _int("seed", 0)
        if isinstance(self.damping, bool) or not (isinstance(self.damping, (int, float)) and np.isfinite(self.damping)
                                                  and self.damping >= 0):
            raise SettingsError(f"damping must be a number >= 0, got {self.damping!r}")
        if self.distill not in DISTILLS:
            raise SettingsError(f"distill must be one of {', '.join(DISTILLS)}, got {self.distill!r}")
        if self.augment not in AUGMENTS:
            raise SettingsError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        for name in ("uniform_layers", "weight_target_layers"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        self.uniform_patterns()  # validates the :BITS suffixes
        if self.uniform_rounding not in UNIFORM_ROUNDINGS:
            raise SettingsError(f"uniform_rounding must be one of {', '.join(UNIFORM_ROUNDINGS)}, got "
                                f"{self.uniform_rounding!r}")
        if self.uniform_clip not in UNIFORM_CLIPS:
            raise SettingsError(f"uniform_clip must be one of {', '.join(UNIFORM_CLIPS)}, got {self.uniform_clip!r}")
        if not isinstance(self.uniform_act_order, bool):
            raise SettingsError(f"uniform_act_order must be True or False, got {self.uniform_act_order!r}")
        if self.target not in TARGETS:
            raise SettingsError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not (isinstance(self.finetune_lr, (int, float)) and np.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise SettingsError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")
        if not isinstance(self.selection, LayerSelection):
            raise SettingsError("selection must be a LayerSelection")

    def uniform_patterns(self) -> tuple[tuple[str, int | None], ...]:
        """uniform_layers as (fnmatch pattern, bits or None for selection.keep_bits): an entry
        'PATTERN:BITS' puts the layers it names on a BITS-bit grid (2-8)."""
        out = []
        for entry in self.uniform_layers:
            pattern, sep, bits = entry.rpartition(":")
            if not sep:
                out.append((entry, None))
                continue
            if not pattern or not bits.isdigit() or not 2 <= int(bits) <= 8:
                raise SettingsError(f"uniform_layers entry {entry!r}: expected PATTERN or PATTERN:BITS with BITS "
                                    "from 2 to 8")
            out.append((pattern, int(bits)))
        return tuple(out)

    def target_for(self, name: str) -> str:
        """The target of layer `name`: "weight" when a weight_target_layers pattern matches it, else `target`."""
        return "weight" if any(fnmatch.fnmatchcase(name, p) for p in self.weight_target_layers) else self.target

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


UNIFORM_ROUNDINGS = ("nearest", "gptq")
UNIFORM_CLIPS = ("weight", "input")


def _patterns(name: str, value) -> tuple[str, ...]:
    """Layer-name patterns (fnmatch) from a comma-separated string or a sequence of strings."""
    pats = value
    if isinstance(pats, str):
        pats = tuple(p.strip() for p in pats.split(",") if p.strip())
    if not isinstance(pats, (tuple, list)) or not all(isinstance(p, str) and p for p in pats):
        raise SettingsError(f"{name} must be layer-name patterns (fnmatch, comma-separated), got {value!r}")
    return tuple(pats)


PQ_OPTIONS = (
    CliOption("--blocks", "blocks", BLOCK_PRESETS,
              "PQ block sizes: small (kh*kw for k x k kernels, 4 for 1x1/linear) or large (2*kh*kw, 8) [small]."),
    CliOption("--block-size", "block_size", str,
              "PQ block size per kernel kind or layer, e.g. 1x1=8,3x3=18,linear=8,_conv_head=8 (kinds: 1x1, kxk, "
              "3x3, 5x5..., depthwise, linear; any other key is a layer-name pattern, fnmatch-style, and wins over "
              "the kinds); overrides --blocks."),
    CliOption("--codewords", "codewords", int, "PQ codewords per layer, 1-256 (uint8 codes) [256]."),
    CliOption("--em-iters", "em_iters", int, "PQ EM iterations per layer [20]."),
    CliOption("--finetune-steps", "finetune_steps", int, "Distillation fine-tuning steps after the fit, 0 = none [100]."),
    CliOption("--finetune-lr", "finetune_lr", float, "PQ fine-tuning learning rate (Adam) [1e-4]."),
    CliOption("--calib-size", "calib_size", int, "Calibration images used [256]."),
    CliOption("--stats-size", "stats_size", int,
              "PQ: calibration images for each layer's input statistics (one forward each) [64]."),
    CliOption("--stats-patches", "stats_patches", int,
              "PQ: raise a layer's statistics images (up to --calib-size) until it sees this many patches per "
              "input it has; 0 = --stats-size for every layer [0]."),
    CliOption("--error-feedback/--no-error-feedback", "error_feedback", bool,
              "PQ: assign codes block by block, compensating each block's error in the next ones [on]."),
    CliOption("--channel-scale/--no-channel-scale", "channel_scale", bool,
              "PQ: float16 scale per output channel (BN-fused weights) [on]."),
    CliOption("--finetune-biases/--no-finetune-biases", "finetune_biases", bool,
              "PQ: fine-tune the (corrected) biases too [on]."),
    CliOption("--finetune-last/--no-finetune-last", "finetune_last", bool,
              "PQ: fine-tune the last layer (the classifier) too [on]."),
    CliOption("--finetune-scales/--no-finetune-scales", "finetune_scales", bool,
              "PQ: fine-tune the channel scales too [on]."),
    CliOption("--distill", "distill", DISTILLS,
              "PQ fine-tuning loss: kl (soft cross-entropy to the float softmax) or mse (centred logits, every class "
              "counts the same) [kl]."),
    CliOption("--augment", "augment", AUGMENTS,
              "PQ fine-tuning images: none, flip, crop (random resized crops and flips) or mix [none]."),
    CliOption("--uniform-layers", "uniform_layers", str,
              "PQ: layer-name patterns (fnmatch, comma-separated, e.g. '_conv_head,*_depthwise_conv') kept on the "
              "uniform grid at --keep-bits instead of product-quantized; PATTERN:BITS sets their bits (2-8)."),
    CliOption("--uniform-rounding", "uniform_rounding", UNIFORM_ROUNDINGS,
              "PQ: rounding of the --uniform-layers: nearest, or gptq (error feedback on the partially quantized "
              "network's inputs, fitted to --target, bias-corrected) [nearest]."),
    CliOption("--uniform-clip", "uniform_clip", UNIFORM_CLIPS,
              "PQ: range of the GPTQ-rounded --uniform-layers' per-channel grids: weight (least squared weight "
              "error) or input (least layer-output error on the calibration inputs, as CoRa) [weight]."),
    CliOption("--uniform-act-order/--no-uniform-act-order", "uniform_act_order", bool,
              "PQ: GPTQ rounds the --uniform-layers' columns by descending input energy (as CoRa) [off]."),
    CliOption("--damping", "damping", float,
              "PQ: EM ridge toward plain k-means, relative to the layer's mean input energy; keeps weights the "
              "calibration never excites [0.01]."),
    CliOption("--target", "target", TARGETS,
              "PQ: fit each layer to its own float weight (weight) or to the float network's output of the layer "
              "(float: corrects the error of the layers before it; one more forward per layer) [float]."),
    CliOption("--weight-target-layers", "weight_target_layers", str,
              "PQ: layer-name patterns (fnmatch, comma-separated, e.g. '_fc') fitted to their own float weight "
              "whatever --target says."),
    CliOption("--bias-correction/--no-bias-correction", "bias_correction", bool,
              "PQ: correct biases so output means match the float model [on]."),
)
