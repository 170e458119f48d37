"""The Plan: what the search decided for every layer, in plain frozen dataclasses.

A Plan is independent of torch and ONNX (numpy arrays only) and is saved as two files,
``NAME.json`` (settings, scalars) and ``NAME.npz`` (arrays), so search and export can run
separately. Each layer names its weight by the torch module path; the ONNX initializer is
``<module path>.weight`` (torch.onnx keeps parameter names).

Components of a layer are optional: ``uniform`` (integer grid), ``adapter`` (low-rank
correction), ``codebook`` (product quantization). New component types register in
``_COMPONENTS``; serialization is generic over their dataclass fields. ``fingerprint`` records
the float weight the layer was planned from (shape, dtype, SHA-256, a few values), so a pass
that replaces the ONNX initializer of that name can prove it is still that weight (the exporter
may rewrite weights, e.g. fuse a BatchNorm into them). Plans saved without it still load.

Beside the layers, a Plan holds how it is written into the graph, so that applying a saved plan
rebuilds the file `quantize` wrote: ``merge_bits`` (CoRa adapters merged into 7- or 8-bit integer
weights at load instead of branch convolutions), ``weight_layout`` (decode: integer grids decoded
by standard ops ONNX Runtime folds at load; qdq: DequantizeLinear nodes), ``adapter_layout``
(branch or merge, None: merge with merge_bits or the decode layout) and ``activations`` (static
integer activations: the scheme and every calibrated range), and in ``meta`` the preprocessing.
Plans saved without a weight layout apply as qdq, as they were written then. Plans of format 1
(before these were stored) load as weight-only plans, with a warning naming what they lack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cora_onnx.core.errors import PlanError, WEIGHT_BITS
from cora_onnx.core.files import atomic_write

__all__ = ["WeightFingerprint", "UniformWeights", "LowRankAdapter", "Codebook", "Bias", "BIAS_DTYPES", "LayerPlan",
           "ActivationPlan", "Plan", "PLAN_FORMAT"]

log = logging.getLogger(__name__)

PLAN_FORMAT = 2  # 2: merge_bits and activations; 1 (still read): layers, settings and meta only


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(msg)


@dataclass(frozen=True)
class WeightFingerprint:
    """What identifies a float weight: shape, dtype, SHA-256 of its C-order bytes, and the values
    at a few fixed positions (only for the message when it differs)."""

    shape: tuple[int, ...]
    dtype: str
    sha256: str
    samples: tuple[float, ...] = ()

    SAMPLES = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "samples", tuple(float(v) for v in self.samples))
        _check(len(self.sha256) == 64, "weight fingerprint sha256 must be 64 hex digits")

    @staticmethod
    def _positions(size: int) -> np.ndarray:
        return np.unique(np.linspace(0, max(size - 1, 0), WeightFingerprint.SAMPLES).astype(np.int64))

    @classmethod
    def of(cls, weight: np.ndarray) -> "WeightFingerprint":
        w = np.ascontiguousarray(weight)
        flat = w.reshape(-1)
        samples = tuple(float(flat[i]) for i in cls._positions(flat.size)) if flat.size else ()
        return cls(tuple(w.shape), w.dtype.name, hashlib.sha256(w.tobytes()).hexdigest(), samples)

    def mismatch(self, weight: np.ndarray) -> str | None:
        """None when weight is the fingerprinted one, else what differs (one phrase)."""
        w = np.asarray(weight)
        if tuple(w.shape) != self.shape:
            return f"shape {tuple(w.shape)} instead of {self.shape}"
        if w.dtype.name != self.dtype:
            return f"dtype {w.dtype.name} instead of {self.dtype}"
        other = WeightFingerprint.of(w)
        if other.sha256 == self.sha256:
            return None
        pairs = ", ".join(f"{a:.6g} (planned {b:.6g})" for a, b in zip(other.samples, self.samples))
        return f"different values: {pairs}" if pairs else "different values"


@dataclass(frozen=True, eq=False)
class UniformWeights:
    """Weight on a uniform integer grid: w_hat = (q - zero_point) * scale along axis 0.

    q holds the integer values (int8 when symmetric, uint8 otherwise) in the weight's shape;
    scale and zero_point have shape (C_out,) when per_channel else (1,).

    group > 0 (per_channel and symmetric only): one scale per `group` consecutive weights of an
    output channel, the channel's weights flattened in torch order (q.reshape(C_out, -1), K values);
    scale and zero_point (all 0) then have shape (C_out, ceil(K / group)), the last group of a row is
    shorter when group does not divide K, and the scales are float16 values (stored as float16).
    """

    bits: int
    symmetric: bool
    per_channel: bool
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    group: int = 0

    def __post_init__(self) -> None:
        _check(int(self.bits) in WEIGHT_BITS, f"uniform bits must be 2-8, got {self.bits}")
        _check(isinstance(self.group, (int, np.integer)) and not isinstance(self.group, bool) and int(self.group) >= 0,
               f"uniform group must be an integer >= 0 (0: no groups), got {self.group!r}")
        object.__setattr__(self, "group", int(self.group))
        lo, hi = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.symmetric else (0, (1 << self.bits) - 1)
        want = np.int8 if self.symmetric else np.uint8
        _check(self.q.dtype == want, f"uniform q must be {np.dtype(want).name}, got {self.q.dtype}")
        _check(self.q.size == 0 or (int(self.q.min()) >= lo and int(self.q.max()) <= hi),
               f"uniform q values outside the {self.bits}-bit grid [{lo}, {hi}]")
        if self.group:
            _check(self.per_channel and self.symmetric,
                   f"uniform group {self.group} needs per_channel and symmetric grids")
            _check(self.q.ndim >= 1 and self.q.size > 0, "uniform group needs a non-empty weight")
            want_shape = (self.q.shape[0], self.groups)
        else:
            want_shape = (self.q.shape[0] if self.per_channel else 1,)
        _check(self.scale.shape == want_shape and self.zero_point.shape == want_shape,
               f"uniform scale/zero_point must have shape {want_shape}, got {self.scale.shape}/{self.zero_point.shape}")
        _check(self.scale.dtype == np.float32 and bool(np.all(self.scale > 0)) and bool(np.all(np.isfinite(self.scale))),
               "uniform scale must be positive finite float32")
        _check(self.zero_point.dtype == self.q.dtype, "uniform zero_point must have the dtype of q")
        if self.group:
            _check(not np.any(self.zero_point), "uniform group scales take zero points of 0 only")
            with np.errstate(over="ignore"):
                exact = self.scale.astype(np.float16).astype(np.float32) == self.scale
            _check(bool(np.all(exact)), f"uniform group scales must be exactly representable in float16 (they are "
                                        f"stored so): {int(np.sum(~exact))} of {self.scale.size} are not")

    @property
    def groups(self) -> int:
        """Scale groups per output channel (ceil(K / group)); 1 without groups."""
        if not self.group:
            return 1
        k = self.q.size // self.q.shape[0]
        return -(-k // self.group)

    def stored_bits(self) -> int:
        """Bits this component takes in the exported file: grid values, float32 scales, zero points
        (with groups: grid values and float16 scales, no zero points)."""
        if self.group:
            return self.bits * self.q.size + 16 * self.scale.size
        return self.bits * (self.q.size + self.zero_point.size) + 32 * self.scale.size

    def dequantize(self) -> np.ndarray:
        if self.group:  # float32 q * s, as DequantizeLinear(block_size=group) computes it
            c = self.q.shape[0]
            q2 = self.q.reshape(c, -1).astype(np.float32)
            s = np.repeat(self.scale.astype(np.float32), self.group, axis=1)[:, :q2.shape[1]]
            return (q2 * s).astype(np.float32).reshape(self.q.shape)
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        return ((self.q.astype(np.float32) - self.zero_point.reshape(shape).astype(np.float32))
                * self.scale.reshape(shape)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class LowRankAdapter:
    """Low-rank correction added in parallel to a conv: B(A(x)).

    a: (rank, C_in/groups, kh, kw) weights of a conv with the layer's kernel, stride, padding
    and dilation; b: (C_out, rank, 1, 1) weights of a 1x1 conv. bits: None for float adapters,
    else the bit width of their (per-channel, symmetric) quantization, already applied to a and b.
    """

    rank: int
    a: np.ndarray
    b: np.ndarray
    bits: int | None = None
    a_scale: np.ndarray | None = None
    b_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"adapter rank must be >= 1, got {self.rank}")
        _check(self.a.shape[0] == self.rank and self.b.shape[1] == self.rank,
               f"adapter shapes {self.a.shape}/{self.b.shape} do not match rank {self.rank}")
        _check(self.a.dtype == np.float32 and self.b.dtype == np.float32, "adapter factors must be float32")
        _check(self.bits is None or self.bits in WEIGHT_BITS, f"adapter bits must be 2-8 or None, got {self.bits}")
        if self.bits is not None:
            _check(self.a_scale is not None and self.b_scale is not None
                   and self.a_scale.shape == (self.rank,) and self.b_scale.shape == (self.b.shape[0],),
                   "quantized adapters need per-channel scales a_scale (rank,) and b_scale (C_out,)")
            for t, sc in ((self.a, self.a_scale), (self.b, self.b_scale)):
                q = t.reshape(t.shape[0], -1) / sc.reshape(-1, 1)
                lim = (1 << (self.bits - 1)) - 1
                _check(bool(np.all(np.abs(q - np.round(q)) < 1e-3)) and float(np.abs(q).max(initial=0)) <= lim + 1e-3,
                       f"adapter factors are not on their {self.bits}-bit grid")

    def integers(self, which: str) -> np.ndarray:
        """The grid values of factor "a" or "b" (int8), for quantized adapters."""
        t, sc = (self.a, self.a_scale) if which == "a" else (self.b, self.b_scale)
        return np.round(t / sc.reshape((-1,) + (1,) * (t.ndim - 1))).astype(np.int8)

    @property
    def params(self) -> int:
        return int(self.a.size + self.b.size)

    def stored_bits(self) -> int:
        """Float32 factors, or `bits` per value plus a float32 scale and a zero point per output channel."""
        if self.bits is None:
            return 32 * self.params
        channels = self.a.shape[0] + self.b.shape[0]
        return self.bits * self.params + (32 + self.bits) * channels


@dataclass(frozen=True, eq=False)
class Codebook:
    """Product quantization: the weight, viewed as (C_in*kh*kw/d) x C_out sub-vectors of size
    block_size, is codewords[codes]. codewords: (k, block_size) float16; codes: uint8 for up to 256
    codewords, uint16 for more (up to 65,536).

    Layout (the one definition, see `decode`): each output channel's filter, flattened in
    (C_in/groups, kh, kw) order, is cut into consecutive sub-vectors of block_size values; codes
    has shape (C_out, C_in/groups*kh*kw/block_size) and codes[o, j] picks the codeword of the
    j-th sub-vector of filter o. scale: optional float16 or float32 (C_out,) multiplying each decoded
    filter (the per-channel factor BatchNorm fusion puts into a weight, so codewords are shared
    across channels of different magnitude; float32 when it must be exact, e.g. gamma/sqrt(var+eps)
    of an imported checkpoint). bias: optional float32 or float16 (C_out,) that replaces the layer's
    bias (bias correction after quantization; not counted in stored_bits: the float bias is
    stored either way)."""

    block_size: int
    codewords: np.ndarray
    codes: np.ndarray
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check(self.codewords.ndim == 2 and self.codewords.shape[1] == self.block_size,
               f"codewords must have shape (k, {self.block_size}), got {self.codewords.shape}")
        _check(self.codewords.dtype == np.float16, f"codewords must be float16, got {self.codewords.dtype}")
        k = self.codewords.shape[0]
        want = np.uint8 if k <= 256 else np.uint16
        _check(k <= 65536, f"at most 65536 codewords, got {k}")
        _check(self.codes.dtype == want, f"codes must be {np.dtype(want).name} with {k} codewords "
                                         f"(uint8 up to 256, uint16 above), got {self.codes.dtype}")
        _check(self.codes.ndim == 2, f"codes must have shape (C_out, sub-vectors per filter), got {self.codes.shape}")
        _check(self.codes.size == 0 or int(self.codes.max()) < self.codewords.shape[0],
               f"codes refer to codeword {int(self.codes.max()) if self.codes.size else 0} of {self.codewords.shape[0]}")
        _check(self.scale is None or (self.scale.dtype in (np.float16, np.float32)
                                      and self.scale.shape == (self.codes.shape[0],)),
               f"codebook scale must be float16 or float32 of shape ({self.codes.shape[0]},)")
        _check(self.bias is None or (self.bias.dtype in (np.float32, np.float16) and self.bias.shape == (self.codes.shape[0],)),
               f"codebook bias must be float32 or float16 of shape ({self.codes.shape[0]},)")

    def stored_bits(self) -> int:
        return (8 * self.codes.itemsize * self.codes.size + 16 * self.codewords.size
                + (0 if self.scale is None else 8 * self.scale.itemsize * self.scale.size))

    def decode(self, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 weight of `shape` (C_out, ...): codewords[codes], times scale per output channel."""
        shape = tuple(int(s) for s in shape)
        _check(int(np.prod(shape)) == self.codes.size * self.block_size and shape[0] == self.codes.shape[0],
               f"codebook with codes {self.codes.shape} x block {self.block_size} cannot decode to shape {shape}")
        w = self.codewords.astype(np.float32)[self.codes.astype(np.intp)].reshape(shape[0], -1)
        if self.scale is not None:
            w = w * self.scale.astype(np.float32)[:, None]
        return w.reshape(shape)


BIAS_DTYPES = ("float32", "float16")


@dataclass(frozen=True, eq=False)
class Bias:
    """A new bias for the layer (e.g. after correcting its output statistics): float32 (C_out,).
    dtype: how the file stores it, "float32" or "float16" (half the bytes; the values must then
    be float16 values already, so the PyTorch reference and the file compute the same)."""

    values: np.ndarray
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(self.values.dtype == np.float32 and self.values.ndim == 1 and bool(np.all(np.isfinite(self.values))),
               "bias values must be a finite float32 vector")
        _check(self.dtype in BIAS_DTYPES, f"bias dtype must be one of {', '.join(BIAS_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "float16":
            with np.errstate(over="ignore"):
                exact = self.values.astype(np.float16).astype(np.float32) == self.values
            _check(bool(np.all(exact)), f"float16 bias values must be exactly representable in float16: "
                                        f"{int(np.sum(~exact))} of {self.values.size} are not")

    @classmethod
    def narrowest(cls, values: np.ndarray) -> "Bias":
        """The bias rounded to float16 and stored so when every value fits float16's range, else float32."""
        v = np.asarray(values, dtype=np.float32)
        with np.errstate(over="ignore"):
            half = v.astype(np.float16)
        if np.all(np.isfinite(half)):
            return cls(half.astype(np.float32), dtype="float16")
        return cls(v.copy())

    def stored_bits(self) -> int:
        return 0  # biases are float in every layer; not counted as weight storage


_COMPONENTS: dict[str, type] = {"uniform": UniformWeights, "adapter": LowRankAdapter, "codebook": Codebook,
                                "bias": Bias, "fingerprint": WeightFingerprint}


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """Everything decided for one Conv/Linear layer. kind: "conv" or "linear"; shape: weight shape;
    info: small JSON-able facts (e.g. error measurements) for reports; fingerprint: the float weight
    the layer was planned from (None in plans made before fingerprints, or by hand)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    uniform: UniformWeights | None = None
    adapter: LowRankAdapter | None = None
    codebook: Codebook | None = None
    bias: Bias | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: WeightFingerprint | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name), "layer name must not be empty")
        _check(self.kind in ("conv", "linear"), f"layer {self.name}: kind must be conv or linear, got {self.kind}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.bias is not None:
            _check(self.bias.values.shape == (self.shape[0],),
                   f"layer {self.name}: bias shape {self.bias.values.shape} differs from ({self.shape[0]},)")
        if self.adapter is not None:
            _check(self.kind == "conv" and self.adapter.b.shape[0] == self.shape[0]
                   and self.adapter.a.shape[1:] == self.shape[1:],
                   f"layer {self.name}: adapter shapes {self.adapter.a.shape}/{self.adapter.b.shape} do not fit {self.shape}")
        if self.fingerprint is not None:
            _check(self.fingerprint.shape == self.shape,
                   f"layer {self.name}: fingerprint shape {self.fingerprint.shape} differs from {self.shape}")
        if self.uniform is not None:
            _check(self.uniform.q.shape == self.shape,
                   f"layer {self.name}: q shape {self.uniform.q.shape} differs from weight shape {self.shape}")

    def stored_bits(self) -> int | None:
        """Bits of all stored components, or None when the weight itself stays in float."""
        if self.uniform is None and self.codebook is None:
            return None
        return sum(c.stored_bits() for c in (self.uniform, self.adapter, self.codebook) if c is not None)

    @property
    def weight(self) -> str:
        """Name of the weight parameter (and of the ONNX initializer)."""
        return f"{self.name}.weight"


@dataclass(frozen=True, eq=False)
class ActivationPlan:
    """Static integer activations: act_dtype ("uint8" or "int8") and weight_bits (8, or 7 where
    the CPU's u8 x s8 products saturate) of the scheme and why it was chosen (reason); ranges:
    ONNX tensor name -> calibrated (low, high) for every tensor the activation layout calibrates
    (passes.activation_layout); calibration: the range method that measured them; weight_clip:
    the grid search for float weights quantized by the activation pass."""

    act_dtype: str
    weight_bits: int
    ranges: Mapping[str, tuple[float, float]]
    calibration: str = "minmax"
    reason: str = ""
    weight_clip: str | None = None  # None: by width (cora_onnx.core.npgrid.default_clip)

    def __post_init__(self) -> None:
        _check(self.act_dtype in ("uint8", "int8"), f"activation dtype must be uint8 or int8, got {self.act_dtype!r}")
        _check(self.weight_bits in (7, 8), f"activation scheme weight bits must be 7 or 8, got {self.weight_bits}")
        ranges = {}
        for name, r in dict(self.ranges).items():
            _check(len(r) == 2 and all(np.isfinite(float(v)) for v in r) and float(r[0]) <= float(r[1]),
                   f"activation range of {name} must be finite (low, high) with low <= high, got {r}")
            ranges[str(name)] = (float(r[0]), float(r[1]))
        _check(bool(ranges), "activation plan needs calibrated ranges")
        object.__setattr__(self, "ranges", ranges)


@dataclass(frozen=True, eq=False)
class Plan:
    """A whole model's plan. method: "rtn", "cora", "pq"...; settings: the search settings
    (JSON-able); layers: one LayerPlan per compressed layer; meta: model/preprocessing facts;
    merge_bits: None writes CoRa adapters as branch convolutions, 7 or 8 merges them into the
    Conv's integer weight at load (passes.AdapterMergePass); weight_layout: "qdq" or "decode"
    (cora_onnx.onnx.pipeline.plan_pipeline); adapter_layout: "branch", "merge" (into the float
    weight when merge_bits is None) or None (merge with merge_bits or decode, else branch);
    activations: static integer activations (None: float activations)."""

    method: str
    settings: Mapping[str, Any]
    layers: tuple[LayerPlan, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    merge_bits: int | None = None
    activations: ActivationPlan | None = None
    weight_layout: str = "qdq"
    adapter_layout: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        names = [layer.name for layer in self.layers]
        _check(len(names) == len(set(names)), "plan has duplicate layer names")
        _check(self.merge_bits in (None, 7, 8), f"plan merge_bits must be 7, 8 or None, got {self.merge_bits!r}")
        _check(self.weight_layout in ("qdq", "decode"), f"plan weight_layout must be qdq or decode, got "
                                                        f"{self.weight_layout!r}")
        _check(self.adapter_layout in (None, "branch", "merge"), f"plan adapter_layout must be branch, merge or None, "
                                                                 f"got {self.adapter_layout!r}")

    def replace(self, **changes: Any) -> "Plan":
        """A copy with `changes` (fields)."""
        return dataclasses.replace(self, **changes)

    def meta_preprocess(self) -> dict:
        """The preprocessing facts stored in meta (written into exported models' metadata)."""
        return {k: self.meta[k] for k in ("input_size", "crop_ratio", "mean", "std") if k in self.meta}

    def with_fingerprints(self, weights: Mapping[str, "np.ndarray | WeightFingerprint"]) -> "Plan":
        """This plan with each layer's fingerprint taken from weights (layer name -> the float
        weight it was planned from, or its fingerprint); layers absent from weights keep theirs."""
        def of(w) -> WeightFingerprint:
            return w if isinstance(w, WeightFingerprint) else WeightFingerprint.of(w)

        layers = tuple(dataclasses.replace(lp, fingerprint=of(weights[lp.name])) if lp.name in weights else lp
                       for lp in self.layers)
        return self.replace(layers=layers)

    def weight_mismatch(self, weights: Mapping[str, np.ndarray]) -> str | None:
        """None when every fingerprinted layer's weight in `weights` (layer name -> float weight)
        is the one the plan was made from; else the first difference (one phrase)."""
        for lp in self.layers:
            if lp.fingerprint is None:
                continue
            if lp.name not in weights:
                return f"layer {lp.name} is missing"
            diff = lp.fingerprint.mismatch(weights[lp.name])
            if diff is not None:
                return f"layer {lp.name} has {diff}"
        return None

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    # ---- persistence -------------------------------------------------------------------
    @staticmethod
    def paths(path: str | os.PathLike) -> tuple[Path, Path]:
        """The (.json, .npz) pair for a plan path given with or without either suffix."""
        p = Path(path)
        if p.suffix in (".json", ".npz"):
            p = p.with_suffix("")
        return p.with_name(p.name + ".json"), p.with_name(p.name + ".npz")

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write NAME.json and NAME.npz atomically (temporary names, then rename)."""
        jpath, npath = self.paths(path)
        arrays: dict[str, np.ndarray] = {}
        layers = []
        for i, layer in enumerate(self.layers):
            rec: dict[str, Any] = {"name": layer.name, "kind": layer.kind, "shape": list(layer.shape),
                                   "info": dict(layer.info)}
            for comp in _COMPONENTS:
                value = getattr(layer, comp)
                if value is None:
                    continue
                crec = {}
                for f in dataclasses.fields(value):
                    v = getattr(value, f.name)
                    if isinstance(v, np.ndarray):
                        key = f"{i}/{comp}/{f.name}"
                        arrays[key] = v
                        crec[f.name] = {"array": key}
                    else:
                        crec[f.name] = v
                rec[comp] = crec
            layers.append(rec)
        doc = {"format": PLAN_FORMAT, "method": self.method, "settings": dict(self.settings),
               "meta": dict(self.meta), "merge_bits": self.merge_bits, "weight_layout": self.weight_layout,
               "adapter_layout": self.adapter_layout,
               "activations": None if self.activations is None else
               {f.name: getattr(self.activations, f.name) for f in dataclasses.fields(ActivationPlan)},
               "layers": layers}
        atomic_write(npath, lambda f: np.savez(f, **arrays))
        atomic_write(jpath, lambda f: f.write(json.dumps(doc, indent=1, default=_json_default).encode()))
        return jpath, npath

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        jpath, npath = cls.paths(path)
        for p in (jpath, npath):
            if not p.is_file():
                raise PlanError(f"plan file {p} does not exist")
        try:
            doc = json.loads(jpath.read_text())
            arrays = dict(np.load(npath, allow_pickle=False))
        except (ValueError, OSError) as exc:
            raise PlanError(f"plan {jpath.with_suffix('')} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") not in (1, PLAN_FORMAT):
            raise PlanError(f"{jpath} is not a cora-onnx plan (format 1 or {PLAN_FORMAT})")
        if doc["format"] == 1:
            log.warning("plan %s was saved by an older cora-onnx (plan format 1): it holds no activation scheme, "
                        "calibrated ranges or adapter merge width, so it applies as weights only with float "
                        "activations and adapters as branches; save it again with quantize --plan-out for the "
                        "integer-activation layout", jpath.with_suffix(""))
        try:
            layers = []
            for rec in doc["layers"]:
                comps = {}
                for comp, ctype in _COMPONENTS.items():
                    if comp in rec:
                        kw = {k: (arrays[v["array"]] if isinstance(v, dict) and "array" in v else v)
                              for k, v in rec[comp].items()}
                        comps[comp] = ctype(**kw)
                layers.append(LayerPlan(name=rec["name"], kind=rec["kind"], shape=tuple(rec["shape"]),
                                        info=rec.get("info", {}), **comps))
            act = doc.get("activations")
            return cls(method=doc["method"], settings=doc.get("settings", {}), layers=tuple(layers),
                       meta=doc.get("meta", {}), merge_bits=doc.get("merge_bits"),
                       weight_layout=doc.get("weight_layout", "qdq"), adapter_layout=doc.get("adapter_layout"),
                       activations=None if act is None else ActivationPlan(**act))
        except (KeyError, TypeError) as exc:
            raise PlanError(f"plan {jpath} is malformed: {exc}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")
