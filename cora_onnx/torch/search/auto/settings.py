"""Settings of the size-targeted search: `AutoSettings` (validated), the menus per method, the CLI options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from cora_onnx.core.encoding import Encoding
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.search.cli_options import CliOption
from cora_onnx.torch.search.distill import AUGMENTS, DISTILLS
from cora_onnx.torch.search.layers import LayerSelection

__all__ = ["AutoSettings", "AUTO_OPTIONS", "HARMS", "FAMILIES", "METHOD_FAMILIES", "FINETUNE_STEPS", "FINETUNE_ABOVE"]

HARMS = ("kl", "output")
FAMILIES = ("uniform", "pq", "adapters")
# what a size target may choose among when the user names a method (--method pq --target-ratio 20)
METHOD_FAMILIES = {"auto": FAMILIES, "pq": ("pq",), "cora": ("uniform", "adapters"), "rtn": ("uniform",)}
# finetune_steps None (the default): FINETUNE_STEPS distillation steps when the choice's predicted
# harm (its summed per-layer KL, about the network's mean KL on new images) exceeds FINETUNE_ABOVE,
# none otherwise: a choice predicted faithful keeps its search time, a damaged one spends it where
# it pays (EfficientNet-Lite0 at 15x; docs/results/size-target.md)
FINETUNE_STEPS = 250
FINETUNE_ABOVE = 0.1


@dataclass(frozen=True)
class AutoSettings:
    """A search that gives every Conv/Linear layer its own encoding under one byte budget.

    budget_bytes: the bytes the layers' encodings may take in the file; costs: layer -> encoding
    label -> its bytes in the file (graph nodes, names, scales, codebooks, adapters included), both
    measured on the exported graph by cora_onnx.run.stages.size_budget from the size target.
    families: what the menu holds: uniform grids of `widths` bits with one float16 scale per channel
    or per `groups` weights, product quantization (256 codewords, `pq_blocks` weights per sub-vector
    for 1x1 convs and Linear layers, kh*kw and kw for k x k kernels), low-rank adapters of ranks
    `ranks` (fractions of the layer's full rank) at adapter_bits beside the uniform grids below 8 bits
    of ungrouped convs. Codebooks are fitted with menu_em_iters EM iterations to rank the menu, em_iters
    for the choice. harm: "kl" (each layer's relative output error times its sensitivity: the
    network's KL(float || quantized) on sens_images calibration images with only that layer on a
    reference encoding, per unit of that encoding's output error) or "output" (the relative output
    error alone). Statistics: each layer's input covariance from stats_size calibration images,
    raised up to calib_size until it sees stats_patches patches per input. After the choice, the
    chosen encodings are fitted to the float weights under those statistics; refit: instead, layer
    after layer to the float network's output on the partially quantized network (Linear layers
    to their own weight), which generalizes worse to new classes (search_auto's module doc). finetune_steps: distillation of the
    codewords, grid scales (below 8 bits), adapters and biases afterwards (search_batch images per step, `distill` loss, Adam steps of
    finetune_lr times each tensor's RMS); None: FINETUNE_STEPS when the choice's predicted harm
    exceeds FINETUNE_ABOVE, else none (`finetune_steps_for`). augment: the distillation images, as
    CoraSettings.augment (none, flip, crop, mix; the float model's outputs then come per step).
    bits: not used (accepted because every method receives --bits)."""

    bits: int | None = None
    budget_bytes: int | None = None
    costs: Any = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES
    widths: tuple[int, ...] = (2, 3, 4, 8)
    groups: tuple[int, ...] = (0, 64)
    pq_blocks: tuple[int, ...] = (2, 4, 8)
    ranks: tuple[float, ...] = (1 / 16, 1 / 8)
    adapter_bits: int = 4
    harm: str = "kl"
    calib_size: int = 1600
    stats_size: int = 64
    stats_patches: int = 128
    sens_images: int = 32
    search_batch: int = 32
    em_iters: int = 20
    menu_em_iters: int = 8
    damping: float = 0.01
    refit: bool = False
    finetune_steps: int | None = None
    NONE_MEANS: ClassVar[dict[str, str]] = {"finetune_steps": f"{FINETUNE_STEPS} when the choice's predicted harm "
                                                               f"exceeds {FINETUNE_ABOVE:g}, else 0"}
    finetune_lr: float = 1e-3
    distill: str = "kl"
    augment: str = "none"
    seed: int = 0
    selection: LayerSelection = field(default_factory=lambda: LayerSelection(keep=()))

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
                raise SettingsError(f"{name} must be an integer {rng}, got {v!r}")

        if self.budget_bytes is not None:
            _int("budget_bytes", 0)
        object.__setattr__(self, "families", tuple(self.families))
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families or self.families == ("adapters",):
            raise SettingsError(f"families must be some of {', '.join(FAMILIES)} (adapters need uniform), got "
                                f"{self.families!r}")
        for name, lo, hi in (("widths", 2, 8), ("groups", 0, 65536), ("pq_blocks", 1, 4096)):
            values = tuple(getattr(self, name))
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi
                                 for v in values):
                raise SettingsError(f"{name} must be integers from {lo} to {hi}, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(set(int(v) for v in values))))
        if any(g == 1 for g in self.groups):
            raise SettingsError("groups must be 0 (per channel) or at least 2 weights per scale")
        ranks = tuple(self.ranks)
        if any(not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 1 for r in ranks):
            raise SettingsError(f"ranks must be fractions of the full rank in (0, 1], got {ranks!r}")
        object.__setattr__(self, "ranks", tuple(sorted(set(float(r) for r in ranks))))
        _int("adapter_bits", 2, 8)
        if self.harm not in HARMS:
            raise SettingsError(f"harm must be one of {', '.join(HARMS)}, got {self.harm!r}")
        for name in ("calib_size", "stats_size", "sens_images", "search_batch", "em_iters", "menu_em_iters"):
            _int(name, 1)
        for name in ("stats_patches", "seed"):
            _int(name, 0)
        if self.finetune_steps is not None:
            _int("finetune_steps", 0)
        if isinstance(self.damping, bool) or not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise SettingsError(f"damping must be a number >= 0, got {self.damping!r}")
        if not (isinstance(self.finetune_lr, (int, float)) and self.finetune_lr > 0):
            raise SettingsError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")
        if self.distill not in DISTILLS:
            raise SettingsError(f"distill must be one of {', '.join(DISTILLS)}, got {self.distill!r}")
        if self.augment not in AUGMENTS:
            raise SettingsError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not isinstance(self.refit, bool):
            raise SettingsError(f"refit must be True or False, got {self.refit!r}")
        if not isinstance(self.selection, LayerSelection):
            raise SettingsError("selection must be a LayerSelection")
        if not isinstance(self.costs, Mapping):
            raise SettingsError("costs must map layer names to {encoding label: bytes}")
        for name, table in self.costs.items():
            for label, b in dict(table).items():
                Encoding.parse(label)
                if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0:
                    raise SettingsError(f"cost of {label} for {name} must be whole bytes >= 0, got {b!r}")

    def finetune_steps_for(self, predicted_harm: float) -> int:
        """The fine-tuning steps of a choice whose predicted harm is `predicted_harm`: finetune_steps
        when given, else FINETUNE_STEPS above FINETUNE_ABOVE and 0 at or below it."""
        if self.finetune_steps is not None:
            return int(self.finetune_steps)
        return FINETUNE_STEPS if predicted_harm > FINETUNE_ABOVE else 0

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["costs"] = {n: dict(t) for n, t in self.costs.items()}
        return out


AUTO_OPTIONS = (
    CliOption("--calib-size", "calib_size", int, "Calibration images used [1600]."),
    CliOption("--stats-patches", "stats_patches", int,
              "Raise a layer's statistics images (up to --calib-size) until it sees this many patches per input it "
              "has [auto: 128]."),
    CliOption("--sens-images", "sens_images", int, "Calibration images for each layer's measured harm [auto: 32]."),
    CliOption("--finetune-steps", "finetune_steps", int, "Distillation steps on the codewords, grid scales, "
              "adapters and biases after the choice [auto: 250 when the choice's predicted harm (KL) exceeds 0.1, else 0]."),
    CliOption("--harm", "harm", HARMS, "What the size-targeted choice minimizes: each layer's output error times "
              "its measured sensitivity (kl), or the output error alone (output) [kl]."),
)
