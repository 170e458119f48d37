"""Which layers are quantized, at which precision: shared by every search method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cora_onnx.core.errors import SettingsError, check_bits
from cora_onnx.core.options import KEEP_CHOICES
from cora_onnx.core.encoding import Encoding, skeleton
from cora_onnx.core.plan import Bias, LayerPlan, UniformWeights
from cora_onnx.torch.quantizers import QuantizedTensor, QuantSpec, group_count

__all__ = ["KEEP_CHOICES", "LayerSelection", "default_selection", "select_layers", "layer_kind", "is_depthwise", "uniform_from",
           "skeleton_layer"]



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


def skeleton_layer(name: str, mod: nn.Module, spec: QuantSpec, adapter_bits: int | None = None,
                   bias: str | None = None) -> LayerPlan:
    """The LayerPlan a search writes for `mod` on `spec`'s grid (as uniform_from stores it), its
    arrays zero-filled and its scales 1 (cora_onnx.core.encoding.skeleton): with a rank-1 low-rank
    adapter when adapter_bits is given (0: float factors, else on grids of that width) and a zero
    bias stored as `bias` ("float32" or "float16"; None: the layer's own bias kept). What a
    method's rehearsal is made of (cora_onnx.torch.search.Method, cora_onnx.run.stages.rehearse)."""
    shape = tuple(int(s) for s in mod.weight.shape)
    lp = skeleton(name, shape, layer_kind(mod), Encoding("uniform", bits=spec.bits, rank=int(adapter_bits is not None),
                                                          adapter_bits=adapter_bits or 8), bias=False)
    c, k = shape[0], int(np.prod(shape[1:]))
    scales = (c, group_count(k, spec.group)) if spec.group else (c if spec.per_channel else 1,)
    grid = uniform_from(QuantizedTensor(q=torch.zeros(shape, dtype=torch.int16), scale=torch.ones(scales),
                                        zero_point=torch.zeros(scales, dtype=torch.int16), spec=spec))
    adapter = lp.adapter
    if adapter_bits == 0:
        adapter = dataclasses.replace(adapter, bits=None, a_scale=None, b_scale=None)
    return dataclasses.replace(lp, uniform=grid, adapter=adapter,
                               bias=Bias(np.zeros(c, np.float32), dtype=bias) if bias else None)
