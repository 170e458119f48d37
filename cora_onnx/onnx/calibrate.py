"""Activation calibration on the ONNX graph, in ONNX Runtime (no torch model needed).

The tensors to measure are added as graph outputs; batches stream through one session and each
tensor keeps only its exact min/max and a histogram (power-of-two bin width, bins aligned to 0,
merged pairwise when the range grows, so memory stays at a few thousand counts per tensor
whatever the number of images). Ranges come from the histogram:

- "minmax": the observed min and max;
- "percentile": the p-th percentile of the values (and 100-p for signed tensors);
- "mse": the range whose 8-bit quantization error, estimated on the histogram (clipping error
  of the bins outside, step^2/12 for the values inside), is smallest, searched on a grid of
  clip ratios of the observed range (both ends independently for signed tensors).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx

from cora_onnx.core.errors import DataError, SettingsError
from cora_onnx.core.options import CALIB_METHODS, DEFAULT_CALIB
from cora_onnx.core.progress import progress

__all__ = ["CALIB_METHODS", "DEFAULT_CALIB", "CalibSettings", "RangeHistogram", "collect_histograms", "compute_ranges",
           "calibrate"]

log = logging.getLogger(__name__)

# CALIB_METHODS, DEFAULT_CALIB (minmax: measured best on both real models, tools/bench_int8.py,
# docs/results/int8.md) are run options: cora_onnx.core.options


@dataclass(frozen=True)
class CalibSettings:
    """method: minmax | percentile | mse; percentile: for "percentile" (99-100); bins: histogram
    resolution (kept between bins and 2*bins); levels: quantization levels the "mse" search
    assumes (256 for 8 bits); batch_size: images per ONNX Runtime call."""

    method: str = DEFAULT_CALIB
    percentile: float = 99.99
    bins: int = 2048
    levels: int = 256
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in CALIB_METHODS:
            raise SettingsError(f"activation calibration must be one of {', '.join(CALIB_METHODS)}, got {self.method!r}")
        if not 90.0 <= float(self.percentile) < 100.0 + 1e-9:
            raise SettingsError(f"percentile must be in [90, 100], got {self.percentile}")
        if not 64 <= int(self.bins) <= 1 << 16:
            raise SettingsError(f"bins must be 64-65536, got {self.bins}")
        if not 1 <= int(self.batch_size) <= 1024:
            raise SettingsError(f"calibration batch size must be 1-1024, got {self.batch_size}")


class RangeHistogram:
    """Streaming min/max and histogram of one tensor. Bin k covers [k*width, (k+1)*width)."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = int(bins)
        self.min = math.inf
        self.max = -math.inf
        self.width = 0.0
        self.k0 = 0
        self.counts = np.zeros(0, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError("calibration produced NaN or infinite activations; check the model and the images")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.width == 0.0:
            span = max(self.max - self.min, 1e-12)
            self.width = 2.0 ** math.ceil(math.log2(span / self.bins))
            self.k0 = math.floor(self.min / self.width)
        k_lo, k_hi = math.floor(self.min / self.width), math.floor(self.max / self.width)
        while k_hi - k_lo + 1 > 2 * self.bins:  # merge pairs of bins (aligned to 0, so exact)
            idx = (self.k0 + np.arange(self.counts.size)) // 2
            new_k0 = self.k0 // 2
            self.counts = np.bincount(idx - new_k0, weights=self.counts).astype(np.int64) if self.counts.size \
                else self.counts
            self.k0, self.width = new_k0, self.width * 2.0
            k_lo, k_hi = math.floor(self.min / self.width), math.floor(self.max / self.width)
        if k_lo < self.k0 or k_hi >= self.k0 + self.counts.size:
            start, stop = min(k_lo, self.k0), max(k_hi + 1, self.k0 + self.counts.size)
            grown = np.zeros(stop - start, dtype=np.int64)
            grown[self.k0 - start:self.k0 - start + self.counts.size] = self.counts
            self.counts, self.k0 = grown, start
        # x / width is exact (power of two); int32 bin indices keep the temporary small
        idx = np.floor(x * np.float32(1.0 / self.width)).astype(np.int32)
        idx -= np.int32(self.k0)
        self.counts += np.bincount(idx, minlength=self.counts.size)[: self.counts.size]

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def centers(self) -> np.ndarray:
        return (self.k0 + np.arange(self.counts.size) + 0.5) * self.width

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the samples lie (bin-edge interpolation)."""
        cdf = np.cumsum(self.counts)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, self.counts.size - 1)
        prev = cdf[i - 1] if i > 0 else 0
        frac = 0.0 if self.counts[i] == 0 else (target - prev) / self.counts[i]
        v = (self.k0 + i + frac) * self.width
        return float(min(max(v, self.min), self.max))


def _mse_range(h: RangeHistogram, levels: int, grid: int = 64) -> tuple[float, float]:
    lo0, hi0 = min(h.min, 0.0), max(h.max, 0.0)
    if hi0 - lo0 <= 0:
        return lo0, hi0
    c = h.centers()
    n = h.counts.astype(np.float64)
    keep = n > 0
    c, n = c[keep], n[keep]
    ratios = np.geomspace(1.0, 0.01, grid)
    his = hi0 * ratios if hi0 > 0 else np.zeros(1)
    los = lo0 * ratios if lo0 < 0 else np.zeros(1)
    # err[i, j] for range [los[i], his[j]]: clipping error outside plus step^2/12 inside
    over = np.maximum(c[None, :] - his[:, None], 0.0) ** 2 @ n  # (len(his),)
    under = np.maximum(los[:, None] - c[None, :], 0.0) ** 2 @ n  # (len(los),)
    inside = ((c[None, None, :] >= los[:, None, None]) & (c[None, None, :] <= his[None, :, None])) @ n
    step = (his[None, :] - los[:, None]) / (levels - 1)
    err = under[:, None] + over[None, :] + inside * step ** 2 / 12.0
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(los[i]), float(his[j])


def compute_ranges(hists: dict[str, RangeHistogram], settings: CalibSettings = CalibSettings()) -> dict[str, tuple[float, float]]:
    """Tensor name -> (low, high) by settings.method."""
    out = {}
    for name, h in hists.items():
        if h.total == 0:
            raise DataError(f"calibration saw no values for tensor {name}")
        if settings.method == "minmax":
            out[name] = (h.min, h.max)
        elif settings.method == "percentile":
            p = settings.percentile / 100.0
            hi = h.quantile(p)
            lo = h.quantile(1.0 - p) if h.min < 0 else h.min
            out[name] = (min(lo, 0.0) if h.min < 0 else lo, hi)
        else:
            out[name] = _mse_range(h, settings.levels)
    return out


def _with_outputs(model_bytes: bytes, tensors: Sequence[str]) -> bytes:
    proto = onnx.load_from_string(model_bytes)
    have = {o.name for o in proto.graph.output}
    produced = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    missing = [t for t in tensors if t not in produced]
    if missing:
        raise SettingsError(f"tensor {missing[0]} is not in the model ({len(missing)} missing)")
    for t in tensors:
        if t not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString()


def collect_histograms(model_bytes: bytes, tensors: Sequence[str], batches: Iterable[np.ndarray], total: int,
                       bins: int = 2048, threads: int | None = None) -> dict[str, RangeHistogram]:
    """Run the model on each batch (N x C x H x W float32) and stream every tensor into its
    histogram (an NHWC model gets its batches transposed; a fixed-batch model runs at its batch).
    Weight DequantizeLinear nodes are folded at load (float kernels, fast)."""
    from cora_onnx.onnx.verify import image_input, run_batch, session

    sess = session(_with_outputs(model_bytes, tensors), threads=threads, fold_weight_dq=True)
    spec = image_input(sess, strict=False)
    step = spec.batch  # a model exported with a fixed batch runs at that batch
    hists = {t: RangeHistogram(bins) for t in tensors}
    skipped = 0
    for x in progress(batches, total, "calibrating activations", "batches"):
        for i in range(0, x.shape[0], step or x.shape[0]):
            chunk = x[i:i + step] if step else x
            if step and chunk.shape[0] != step:
                skipped += chunk.shape[0]  # a partial batch cannot run on a fixed-batch model
                continue
            outs = run_batch(sess, spec, chunk, list(tensors))
            for t, v in zip(tensors, outs):
                hists[t].update(v)
    if skipped:
        log.info("the model's batch is fixed at %d: %d calibration images left over were not used", step, skipped)
    return hists


def calibrate(model_bytes: bytes, tensors: Sequence[str], images, settings: CalibSettings = CalibSettings(),
              threads: int | None = None) -> dict[str, tuple[float, float]]:
    """Ranges of `tensors` over the images of an ImageSet (cora_onnx.onnx.data), streamed in batches."""
    n = (len(images) + settings.batch_size - 1) // settings.batch_size
    batches = images.batches(settings.batch_size)
    hists = collect_histograms(model_bytes, tensors, batches, n, settings.bins, threads)
    ranges = compute_ranges(hists, settings)
    log.info("calibrated %d activation tensors on %d images (%s)", len(ranges), len(images), settings.method)
    return ranges
