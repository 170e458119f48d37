"""How one layer's weight is stored, as a menu item of the size-targeted search (no torch).

An `Encoding` is a uniform grid (bits, one float16 scale per `group` weights of an output channel
or per channel, optionally a low-rank adapter of `rank` beside it) or a product-quantization
codebook (`block` values per sub-vector, `codewords` codewords). `skeleton` is the LayerPlan of
that encoding with zero-filled arrays of the right shapes and types: applying it to an ONNX graph
writes exactly the bytes the real plan will, so a file's size can be measured before any weight
is fitted (cora_onnx.onnx.sizes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cora_onnx.core.errors import SettingsError, WEIGHT_BITS
from cora_onnx.core.plan import Bias, Codebook, LayerPlan, LowRankAdapter, UniformWeights, WeightFingerprint

__all__ = ["Encoding", "PER_CHANNEL", "row_width", "skeleton", "encoding_summary"]

PER_CHANNEL = 0  # Encoding.group: one float16 scale per output channel


def row_width(shape: tuple[int, ...]) -> int:
    """K: the weights of one output channel."""
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


_LABEL = re.compile(r"^(?:(?P<bits>[2-8])-bit(?: g(?P<group>\d+))?(?: \+ rank (?P<rank>\d+)(?: (?P<abits>[2-8])-bit)?)?"
                    r"|pq d=(?P<block>\d+)(?: k=(?P<k>\d+))?)$")


@dataclass(frozen=True, order=True)
class Encoding:
    """kind "uniform": a symmetric `bits`-bit grid, one float16 scale per `group` consecutive
    weights of an output channel (PER_CHANNEL: one per channel), with a low-rank adapter of `rank`
    (0: none) stored at `adapter_bits`; kind "pq": product quantization, `block` weights per
    sub-vector, `codewords` float16 codewords, uint8 codes, a float16 scale per output channel."""

    kind: str
    bits: int = 8
    group: int = PER_CHANNEL
    rank: int = 0
    adapter_bits: int = 8
    block: int = 0
    codewords: int = 256

    def __post_init__(self) -> None:
        if self.kind == "uniform":
            if self.bits not in WEIGHT_BITS or self.group < 0 or self.rank < 0 or self.adapter_bits not in WEIGHT_BITS:
                raise SettingsError(f"not a uniform encoding: {self!r}")
        elif self.kind == "pq":
            if self.block < 1 or not 1 <= self.codewords <= 256:
                raise SettingsError(f"not a product-quantization encoding: {self!r}")
        else:
            raise SettingsError(f"encoding kind must be uniform or pq, got {self.kind!r}")

    @property
    def label(self) -> str:
        """"4-bit", "3-bit g64", "3-bit g64 + rank 8 4-bit", "pq d=4", "pq d=8 k=64": what the report shows."""
        if self.kind == "pq":
            return f"pq d={self.block}" + (f" k={self.codewords}" if self.codewords != 256 else "")
        text = f"{self.bits}-bit" + (f" g{self.group}" if self.group else "")
        return text + (f" + rank {self.rank} {self.adapter_bits}-bit" if self.rank else "")

    @property
    def family(self) -> str:
        """The encoding without its adapter, for counts: "pq", "3-bit", "8-bit"."""
        return "pq" if self.kind == "pq" else f"{self.bits}-bit"

    def without_adapter(self) -> "Encoding":
        return Encoding(self.kind, self.bits, self.group, 0, self.adapter_bits, self.block, self.codewords)

    @classmethod
    def parse(cls, label: str) -> "Encoding":
        m = _LABEL.match(str(label).strip())
        if not m:
            raise SettingsError(f"not an encoding: {label!r} (e.g. 4-bit, 3-bit g64, 3-bit g64 + rank 8 4-bit, pq d=4)")
        if m.group("block"):
            return cls("pq", block=int(m.group("block")), codewords=int(m.group("k") or 256))
        return cls("uniform", bits=int(m.group("bits")), group=int(m.group("group") or 0),
                   rank=int(m.group("rank") or 0), adapter_bits=int(m.group("abits") or 8))

    def fits(self, shape: tuple[int, ...], kind: str, groups: int = 1) -> bool:
        """Whether a layer of this shape (`kind` conv or linear, `groups` conv groups) can take it."""
        k = row_width(shape)
        if self.kind == "pq":
            return k % self.block == 0
        if self.rank:
            return kind == "conv" and groups == 1 and self.bits < 8 and self.rank <= min(shape[0], k)
        return self.group == PER_CHANNEL or self.group < k

    def scale_group(self, shape: tuple[int, ...]) -> int:
        """UniformWeights.group of this grid: `group`, or K (one block per channel) for PER_CHANNEL."""
        return self.group or row_width(shape)


def skeleton(name: str, shape: tuple[int, ...], kind: str, enc: Encoding, bias: bool = True,
             fingerprint: WeightFingerprint | None = None) -> LayerPlan:
    """The LayerPlan of `enc` for a layer with zero-filled arrays of the stored types and shapes
    (and a float16 bias when `bias`): what the passes write for it, byte for byte in size.
    fingerprint: of the layer's float weight, which the passes find a weight the exporter stored
    under another name by (a Linear as a MatMul: passes.WeightNamesPass)."""
    shape = tuple(int(s) for s in shape)
    c, k = shape[0], row_width(shape)
    uniform = adapter = codebook = None
    if enc.kind == "uniform":
        g = enc.scale_group(shape)
        groups = -(-k // g)
        uniform = UniformWeights(bits=enc.bits, symmetric=True, per_channel=True, q=np.zeros(shape, np.int8),
                                 scale=np.ones((c, groups), np.float32), zero_point=np.zeros((c, groups), np.int8),
                                 group=g)
        if enc.rank:
            r = enc.rank
            adapter = LowRankAdapter(rank=r, a=np.zeros((r, *shape[1:]), np.float32),
                                     b=np.zeros((c, r, 1, 1), np.float32), bits=enc.adapter_bits,
                                     a_scale=np.ones(r, np.float32), b_scale=np.ones(c, np.float32))
    else:
        m = k // enc.block
        codebook = Codebook(block_size=enc.block, codewords=np.zeros((enc.codewords, enc.block), np.float16),
                            codes=np.zeros((c, m), np.uint8), scale=np.ones(c, np.float16))
    return LayerPlan(name=name, kind=kind, shape=shape, uniform=uniform, adapter=adapter, codebook=codebook,
                     bias=Bias(np.zeros(c, np.float32), dtype="float16") if bias else None, fingerprint=fingerprint)


def encoding_summary(encodings) -> str:
    """"pq 31 layers, 3-bit 12, 4-bit 5, 8-bit 4; adapters on 9": the layers per family, most
    first, and how many carry an adapter."""
    from collections import Counter

    encodings = list(encodings)
    counts = Counter(e.family for e in encodings)
    parts = [f"{fam} {n}" + (" layers" if i == 0 else "") for i, (fam, n) in
             enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))]
    adapters = sum(1 for e in encodings if e.rank)
    return ", ".join(parts) + (f"; adapters on {adapters}" if adapters else "")
