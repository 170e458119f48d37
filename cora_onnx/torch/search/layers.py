"""Which layers are quantized, at which precision: shared by every search method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from cora_onnx.core.errors import SettingsError, check_bits
from cora_onnx.core.options import KEEP_CHOICES
from cora_onnx.core.plan import UniformWeights
from cora_onnx.torch.quantizers import QuantizedTensor, QuantSpec

__all__ = ["KEEP_CHOICES", "LayerSelection", "default_selection", "select_layers", "layer_kind", "is_depthwise", "uniform_from"]



@dataclass(frozen=True)
class LayerSelection:
    """keep: kinds of layers kept at keep_bits instead of the target bits ("first": the first
    conv, "last": the classifier, "depthwise": grouped convs with one input channel per group);
    skip: module names left in float."""

    keep: tuple[str, ...] = ("first", "last")
    keep_bits: int = 8
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "skip", tuple(self.skip))
        bad = [k for k in self.keep if k not in KEEP_CHOICES]
        if bad:
            raise SettingsError(f"keep must be a subset of {', '.join(KEEP_CHOICES)}, got {bad[0]!r}")
        check_bits(self.keep_bits, "keep_bits")


def default_selection(settings_cls: type) -> LayerSelection:
    """The layer selection a method's settings dataclass uses when none is given."""
    import dataclasses

    f = {f.name: f for f in dataclasses.fields(settings_cls)}.get("selection")
    if f is not None and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return LayerSelection()


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def layer_kind(m: nn.Module) -> str:
    return "linear" if isinstance(m, nn.Linear) else "conv"


def select_layers(layers: dict[str, nn.Module], bits: int, selection: LayerSelection) -> dict[str, int]:
    """Module name -> bit width for every quantized layer (skipped layers are absent)."""
    names = [n for n in layers if n not in selection.skip]
    unknown = [s for s in selection.skip if s not in layers]
    if unknown:
        raise SettingsError(f"skip names a layer the model does not have: {unknown[0]!r}")
    convs = [n for n in names if isinstance(layers[n], nn.Conv2d)]
    linears = [n for n in names if isinstance(layers[n], nn.Linear)]
    keep: set[str] = set()
    if "first" in selection.keep and convs:
        keep.add(convs[0])
    if "last" in selection.keep and (linears or convs):
        keep.add((linears or convs)[-1])
    if "depthwise" in selection.keep:
        keep.update(n for n in convs if is_depthwise(layers[n]))
    return {n: (max(bits, selection.keep_bits) if n in keep else bits) for n in names}


def uniform_from(qt: QuantizedTensor) -> UniformWeights:
    """Plan component from a quantizer result."""
    spec: QuantSpec = qt.spec
    dtype = np.int8 if spec.symmetric else np.uint8
    grouped = {"group": spec.group} if spec.group else {}
    return UniformWeights(bits=spec.bits, symmetric=spec.symmetric, per_channel=spec.per_channel,
                          q=qt.q.numpy().astype(dtype), scale=qt.scale.numpy().astype(np.float32),
                          zero_point=qt.zero_point.numpy().astype(dtype), **grouped)
