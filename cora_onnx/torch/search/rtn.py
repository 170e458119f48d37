"""Round-to-nearest: every selected weight on its uniform grid, no calibration data needed."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from torch import nn

from cora_onnx.core.errors import SettingsError, check_bits
from cora_onnx.core.npgrid import default_clip
from cora_onnx.core.plan import LayerPlan, Plan
from cora_onnx.core.progress import progress
from cora_onnx.torch.quantizers import CLIP_METHODS, QuantSpec, quantizable_layers, quantize_weight
from cora_onnx.torch.search.layers import LayerSelection, layer_kind, select_layers, skeleton_layer, uniform_from
from cora_onnx.torch.search.cli_options import CliOption

__all__ = ["RtnSettings", "search_rtn", "rehearsal_rtn", "RTN_OPTIONS", "GRID_OPTIONS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RtnSettings:
    """bits: 2-8 target width; per_channel / symmetric / clip / k: see QuantSpec;
    selection: which layers stay at higher precision or in float."""

    bits: int = 4
    per_channel: bool = True
    symmetric: bool = True
    clip: str | None = None  # None: by width (cora_onnx.core.npgrid.default_clip)
    k: float = 3.0
    selection: LayerSelection = field(default_factory=LayerSelection)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.clip is not None and self.clip not in CLIP_METHODS:
            raise SettingsError(f"clip must be one of {', '.join(CLIP_METHODS)}, got {self.clip!r}")
        self.spec(self.bits)  # validates k

    def spec(self, bits: int) -> QuantSpec:
        clip = default_clip(bits) if self.clip is None else self.clip
        return QuantSpec(bits=bits, per_channel=self.per_channel, symmetric=self.symmetric, clip=clip, k=self.k)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def search_rtn(model: nn.Module, settings: RtnSettings, calib=None) -> Plan:
    """Quantize every selected Conv2d/Linear weight of a BN-fused model."""
    layers = quantizable_layers(model)
    bits = select_layers(layers, settings.bits, settings.selection)
    plans = []
    for name, b in progress(bits.items(), len(bits), "rtn: layers", "layers"):
        w = layers[name].weight.detach()
        qt = quantize_weight(w, settings.spec(b))
        err = float((qt.dequantize() - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-30))
        plans.append(LayerPlan(name=name, kind=layer_kind(layers[name]), shape=tuple(w.shape),
                               uniform=uniform_from(qt), info={"relative_weight_mse": err}))
        log.debug("%s: %d bits, relative weight MSE %.3g", name, b, err)
    return Plan(method="rtn", settings={"method": "rtn", **settings.to_json()}, layers=tuple(plans))


def rehearsal_rtn(model: nn.Module, settings: RtnSettings) -> tuple[Plan, ...]:
    """What search_rtn writes, zero-filled (skeleton_layer): each selected layer's grid, no bias."""
    layers = quantizable_layers(model)
    bits = select_layers(layers, settings.bits, settings.selection)
    return (Plan("rtn", {}, tuple(skeleton_layer(n, layers[n], settings.spec(b)) for n, b in bits.items())),)


GRID_OPTIONS = (
    CliOption("--per-channel/--per-tensor", "per_channel", bool, "Weight scale granularity [per-channel; cora: from --preset]."),
    CliOption("--symmetric/--asymmetric", "symmetric", bool,
              "Signed grid with zero point 0, or unsigned with a zero point [symmetric; cora: from --preset]."),
    CliOption("--clip", "clip", tuple(CLIP_METHODS),
              "Weight range: min/max, mean +/- k std, or per-channel MSE search [mse below 7 bits, minmax at 7-8; "
              "cora: from --preset]."),
    CliOption("--k", "k", float, "Std multiplier for --clip std [3.0]."),
)
RTN_OPTIONS = GRID_OPTIONS
