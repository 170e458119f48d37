"""The encodings a layer may take (from its shape alone, so the smallest file is known before any fit)."""

from __future__ import annotations

import math

from torch import nn

from cora_onnx.core.encoding import PER_CHANNEL, Encoding, row_width
from cora_onnx.torch.search.auto.settings import AutoSettings
from cora_onnx.torch.search.layers import layer_kind

__all__ = ["layer_menu", "layer_facts"]


def layer_facts(mod: nn.Module) -> tuple[tuple[int, ...], str, int]:
    """(weight shape, "conv" or "linear", conv groups)."""
    return tuple(int(s) for s in mod.weight.shape), layer_kind(mod), int(getattr(mod, "groups", 1))


def _pq_blocks(shape: tuple[int, ...], settings: AutoSettings) -> list[int]:
    """Sub-vector lengths for product quantization: `pq_blocks` for 1x1 convs and Linear layers,
    kh*kw and kw for k x k kernels (depthwise ones too), those that divide the row."""
    k = row_width(shape)
    spatial = shape[2:] if len(shape) == 4 else ()
    if spatial and math.prod(spatial) > 1:
        blocks = {math.prod(spatial), spatial[-1]}
    else:
        blocks = set(settings.pq_blocks)
    return sorted(d for d in blocks if k % d == 0 and k // d >= 1)


def layer_menu(mod: nn.Module, settings: AutoSettings) -> list[Encoding]:
    """Every encoding the layer may take, in a fixed order: uniform grids (each width, per channel
    and per `groups` weights below 8 bits), then codebooks (with codebooks alone, an 8-bit grid
    too), then the grids below 8 bits with each adapter rank (ungrouped convs). Codebooks need at
    least two sub-vectors per codeword on average, or they hold the weights themselves."""
    shape, kind, groups = layer_facts(mod)
    c, k = shape[0], row_width(shape)
    out: list[Encoding] = []
    if "uniform" in settings.families:
        for b in settings.widths:
            for g in ((PER_CHANNEL,) if b >= 8 else settings.groups):
                enc = Encoding("uniform", bits=b, group=g)
                if enc.fits(shape, kind, groups) and enc not in out:
                    out.append(enc)
    if "pq" in settings.families:
        for d in _pq_blocks(shape, settings):
            n = c * (k // d)
            if n >= 2 * min(256, n):
                out.append(Encoding("pq", block=d, codewords=256))
            elif "uniform" not in settings.families:  # pq alone: small layers still need an encoding
                out.append(Encoding("pq", block=d, codewords=max(1, n // 2)))
    if "uniform" not in settings.families:  # codebooks alone: 8 bits stays available (the --keep of --method pq)
        out.append(Encoding("uniform", bits=8))
    if "adapters" in settings.families and kind == "conv" and groups == 1:
        full = min(c, k)
        for enc in [e for e in out if e.kind == "uniform" and e.bits < 8]:
            for f in settings.ranks:
                r = max(1, int(round(f * full)))
                cand = Encoding("uniform", bits=enc.bits, group=enc.group, rank=r, adapter_bits=settings.adapter_bits)
                if cand.fits(shape, kind, groups) and cand not in out:
                    out.append(cand)
    return out
