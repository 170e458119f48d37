"""The run options: one frozen object that carries a run's choices from the command line, the
Python API and sweeps to the stages of `quantize` (and to `rewrite`, `export` and `import-pq`).

It is checked when it is built, before anything heavy (no model, no image is loaded): bit widths,
formats and choices, preprocessing, and the paths (input folders exist, output folders are
writable). The method's own settings (`method_options`) are checked by the torch side
(cora_onnx.run.stages.check_options), also before the model loads. The report records it
(`RunOptions.to_json`).

A new run option is one field here, its flag and help in the field's metadata (the CLI builds the
click option from it: cora_onnx.cli.main.run_option), and its use.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cora_onnx.core.errors import SettingsError, check_bits
from cora_onnx.core.files import check_input_dir, check_input_file, check_output_path

__all__ = ["RunOptions", "Preprocess", "parse_keep", "parse_floats", "IMAGENET_MEAN", "IMAGENET_STD", "ACT_BITS",
           "CALIB_METHODS", "DEFAULT_CALIB", "ADAPTER_LAYOUTS", "OUT_FORMATS", "KEEP_CHOICES", "WEIGHT_LAYOUTS",
           "weight_layout_for"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the usual torchvision normalization
IMAGENET_STD = (0.229, 0.224, 0.225)
ACT_BITS = (8,)  # integer activation widths
CALIB_METHODS = ("minmax", "percentile", "mse")  # activation range methods (cora_onnx.onnx.calibrate)
DEFAULT_CALIB = "minmax"
ADAPTER_LAYOUTS = ("auto", "branch", "merge")
OUT_FORMATS = ("onnx", "ort")
WEIGHT_LAYOUTS = ("auto", "decode", "qdq")  # how quantized weights are written (cora_onnx.onnx.pipeline)
KEEP_CHOICES = ("first", "last", "depthwise")


def weight_layout_for(choice: str, act_bits: int | None, out_format: str = "onnx") -> str:
    """The weight layout a run writes ("decode" or "qdq") for the user's choice: auto is decode for
    an ONNX file with float activations (ONNX Runtime folds the decoding at load: float speed in a
    plain session) and qdq with integer activations (the integer kernels fuse weight
    DequantizeLinear nodes) or the ORT format (its conversion runs the load-time folding, so
    decoded weights would be stored as float). SettingsError for decode with integer activations."""
    _choice(choice, WEIGHT_LAYOUTS, "weight layout")
    if choice == "decode" and act_bits is not None:
        raise SettingsError("weight layout decode is for float activations: with integer activations (act_bits=8) "
                            "the weights stay DequantizeLinear nodes, which ONNX Runtime fuses into integer kernels")
    if choice == "auto":
        return "qdq" if act_bits is not None or out_format == "ort" else "decode"
    return choice


def parse_keep(text: str | Sequence[str]) -> tuple[str, ...]:
    """"first,last" -> ("first", "last"); "none" -> (); a sequence as a tuple."""
    if not isinstance(text, str):
        return tuple(str(s) for s in text)
    text = text.strip().lower()
    return () if text in ("", "none") else tuple(s.strip() for s in text.split(",") if s.strip())


def parse_floats(text: str | Sequence[float], n: int = 3, what: str = "value") -> tuple[float, ...]:
    """Parse '0.485,0.456,0.406' or '127/255' (one value repeated) into n floats."""
    if not isinstance(text, str):
        try:
            vals = tuple(float(v) for v in text)
        except (TypeError, ValueError):
            raise SettingsError(f"{what} must be numbers like 0.485,0.456,0.406 or 127/255, got {text!r}") from None
    else:
        try:
            vals = tuple(float(Fraction(v.strip())) for v in text.split(",") if v.strip())
        except (ValueError, ZeroDivisionError):
            raise SettingsError(f"{what} must be numbers like 0.485,0.456,0.406 or 127/255, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise SettingsError(f"{what} needs 1 or {n} finite numbers, got {text!r}")
    return vals


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to round(input_size / crop_ratio), center-crop input_size, RGB,
    scale to [0, 1], normalize with mean/std (given on that 0-1 scale)."""

    input_size: int = 224
    crop_ratio: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 1 <= int(self.input_size) <= 4096:
            raise SettingsError(f"input size must be 1-4096 pixels, got {self.input_size}")
        if not 0.1 <= self.crop_ratio <= 1.0:
            raise SettingsError(f"crop ratio must be in [0.1, 1], got {self.crop_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise SettingsError(f"mean and std need 3 values each, std > 0; got {self.mean} / {self.std}")

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x 3 x H x W -> normalized float32."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        return (images.astype(np.float32) - mean) / std


def _opt(default: Any, flag: str | None = None, help: str = "", **click: Any) -> Any:  # noqa: A002
    """A run option: its default, and for the CLI its flag, help and click keywords (type,
    multiple, show_default...)."""
    meta = {"flag": flag, "help": help, "click": click}
    if type(default).__hash__ is None:  # a mutable default: each instance gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_PATH = {"type": Path}


@dataclass(frozen=True)
class RunOptions:
    """One run's options, checked at construction (SettingsError or InputError naming the option).
    `RunOptions.of(**keywords)` builds it from `cora_onnx.quantize`'s keywords: those that are not
    fields here are the method's settings (budget=, iters=, clip=, ...; checked by the method)."""

    # what to do
    method: str | None = _opt(None, "--method", "Search method [rtn; auto with a size target].")
    bits: int = _opt(4, "--bits", "Weight bits, 2-8.", type=int, show_default=True)
    target_ratio: float | None = _opt(None, "--target-ratio", "Size target: the file at most the float ONNX file's "
                                      "size / R; every layer's encoding (2-8-bit grids, codebooks, adapters) is "
                                      "chosen under it (with --method rtn, cora or pq: among that method's "
                                      "encodings).", type=float)
    target_size: int | str | None = _opt(None, "--target-size", "Size target in bytes, e.g. 1.9MB, 800kB, 1.5MiB "
                                         "(instead of --target-ratio).")
    method_options: Mapping[str, Any] = _opt({})
    keep: tuple[str, ...] | None = _opt(None, "--keep", "Layers kept at --keep-bits: any of first,last,depthwise, "
                                        "or none [the method's default].")
    keep_bits: int | None = _opt(None, "--keep-bits", "Bits of the layers named by --keep [8].", type=int)
    skip: tuple[str, ...] = _opt((), "--skip", "Layers (module names, comma-separated) left in float, e.g. one "
                                 "the exported graph does not hold.")
    # images
    calib: tuple[Path, ...] = _opt((), "--calib", "Calibration images: flat folder or one folder per class "
                                   "(repeatable: the folders are mixed).", type=Path, multiple=True)
    val: tuple[Path, ...] = _opt((), "--val", "Labelled images, one folder per class, for top-1 (repeatable: "
                                 "the folders are mixed).", type=Path, multiple=True)
    class_map: Path | None = _opt(None, "--class-map", "JSON folder name -> class index, when the labelled folders "
                                  "are a subset of the classes (not needed for ImageNet WordNet-id folders with a "
                                  "1000-class model: a built-in map applies).", **_PATH)
    input_size: int | None = _opt(None, "--input-size", "Square input size in pixels [224; model default].", type=int)
    crop_ratio: float = _opt(1.0, "--crop-ratio", "Resize the shorter side to input-size/crop-ratio, then "
                             "center-crop (0.875 = classic eval).", type=float, show_default=True)
    mean: tuple[float, ...] = _opt(IMAGENET_MEAN, "--mean", "Normalization mean on a 0-1 pixel scale: "
                                   "0.485,0.456,0.406 or 127/255 [ImageNet's; model default].")
    std: tuple[float, ...] = _opt(IMAGENET_STD, "--std", "Normalization std on a 0-1 pixel scale: "
                                  "0.229,0.224,0.225 or 128/255 [ImageNet's; model default].")
    # integer inference and the file
    act_bits: int | None = _opt(None, "--act-bits", "Integer activations (static, calibrated; 8): quantized "
                                "Conv/Gemm/Add run as ONNX Runtime integer kernels; weights use the width this CPU's "
                                "kernels take (7 bits on AVX2 without VNNI).", type=int)
    act_calib: str = _opt(DEFAULT_CALIB, "--act-calib", "Activation ranges: min/max, 99.99th percentile, or the "
                          "histogram range of least 8-bit error.", type=CALIB_METHODS, show_default=True)
    adapter_layout: str = _opt("auto", "--adapter-layout", "CoRa adapters as branch convolutions beside each Conv, "
                               "or merged into the Conv's weight when ONNX Runtime loads the file (the integer weight "
                               "with --act-bits 8, the float weight with the decode weight layout; the file keeps the "
                               "low-bit grid and the factors; no branch latency). auto: merge with --act-bits or the "
                               "decode weight layout, branch otherwise.", type=ADAPTER_LAYOUTS, show_default=True)
    weight_layout: str = _opt("auto", "--weight-layout", "Quantized weights as their integer grids decoded by standard "
                              "ops (Cast, Mul) that ONNX Runtime folds when it loads the file (decode: float speed in "
                              "a plain session), or as DequantizeLinear nodes (qdq: what runtimes with low-bit kernels "
                              "of their own read; ONNX Runtime runs them at each inference). auto: decode for an ONNX "
                              "file with float activations, qdq with --act-bits or --format ort (whose conversion "
                              "would store decoded weights as float).", type=WEIGHT_LAYOUTS, show_default=True)
    out_format: str = _opt("onnx", "--format", "Output format: ONNX, or ONNX Runtime's ORT format (mobile/minimal "
                           "builds; operator report in the JSON report).", type=OUT_FORMATS, show_default=True)
    # outputs
    out: Path | None = _opt(None, "--out", "Output model file.", **_PATH)
    report: Path | None = _opt(None, "--report", "Write the report as JSON here.", **_PATH)
    plan_out: Path | None = _opt(None, "--plan-out", "Save the plan (PLAN.json + PLAN.npz) for `export --plan`.",
                                 **_PATH)
    float_out: Path | None = _opt(None, "--float-out", "Also write the float (BN-fused) ONNX model.", **_PATH)
    model_name: str | None = _opt(None)  # the architecture's name in the report and plan
    # verification
    batch_size: int = _opt(32, "--batch-size", "Images per inference batch (evaluation, parity).", type=int,
                           show_default=True)
    parity_images: int = _opt(1000)  # calibration images for parity when no labelled folder is given
    latency_runs: int = _opt(30, "--latency-runs", "Timed runs per model (after 5 warm-up runs); 0 skips the "
                             "timing.", type=int, show_default=True)
    latency_batch: int | None = _opt(None, "--latency-batch", "Also time this batch size (batch 1 is always "
                                     "timed).", type=int)
    threads: int | None = _opt(None, "--threads", "ONNX Runtime intra-op threads [all cores].", type=int)
    seed: int = _opt(0, "--seed", "Seed of every random choice (image subsets, searches).", type=int,
                     show_default=True)

    @classmethod
    def of(cls, **keywords: Any) -> "RunOptions":
        """Run options from keywords: fields as they are, every other keyword a method option."""
        names = {f.name for f in dataclasses.fields(RunOptions)}
        given = {k: v for k, v in keywords.items() if k in names}
        extra = {k: v for k, v in keywords.items() if k not in names}
        if extra:
            given["method_options"] = {**dict(given.get("method_options") or {}), **extra}
        return cls(**given)

    @classmethod
    def resolve(cls, options: "RunOptions | None" = None, **keywords: Any) -> "RunOptions":
        """`options` with `keywords` applied (as RunOptions.of takes them), or built from keywords."""
        if options is None:
            return cls.of(**keywords)
        if not isinstance(options, RunOptions):
            raise SettingsError(f"options must be a cora_onnx.RunOptions, got {type(options).__name__}")
        if not keywords:
            return options
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(RunOptions)}
        if set(keywords) - set(given):  # method options join those already given
            keywords = {**keywords, "method_options": {**dict(options.method_options),
                                                       **dict(keywords.get("method_options") or {})}}
        return cls.of(**{**given, **keywords})

    def replace(self, **changes: Any) -> "RunOptions":
        """A copy with `changes` (fields, checked again)."""
        return dataclasses.replace(self, **changes)

    def run_options(self) -> "RunOptions":
        """These options as a plain RunOptions (a subclass holding derived values drops them)."""
        return RunOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)})

    @property
    def size_target(self):
        """The SizeTarget of target_ratio / target_size (cora_onnx.core.budget), None without one."""
        from cora_onnx.core.budget import SizeTarget

        return SizeTarget.of(self.target_ratio, self.target_size)

    @property
    def search(self) -> str:
        """The search that runs: "auto" with a size target (restricted to the encodings of the
        method named, if any), else the method (rtn when none is named)."""
        return "auto" if self.size_target is not None else self.method or "rtn"

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing (input size 224 when not given)."""
        return Preprocess(input_size=int(self.input_size or 224), crop_ratio=self.crop_ratio, mean=self.mean,
                          std=self.std)

    def to_json(self) -> dict:
        """The run options as given (JSON-ready; for the report)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(RunOptions)}

    def __reduce__(self):  # picklable (sweep jobs travel to Ray workers) despite the read-only mapping
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return (_rebuild, (type(self), {**values, "method_options": dict(self.method_options)}))

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("method_options", types.MappingProxyType(dict(self.method_options or {})))
        put("calib", _paths(self.calib))
        put("val", _paths(self.val))
        for name in ("class_map", "out", "report", "plan_out", "float_out"):
            value = getattr(self, name)
            put(name, None if value is None else Path(value))
        if self.method is not None and not isinstance(self.method, str):
            raise SettingsError(f"method must be a name, got {self.method!r}")
        if self.size_target is not None:  # checks target_ratio / target_size
            if self.act_bits is not None:
                raise SettingsError("a size target with integer activations (act_bits) is not supported: the "
                                    "activation grids are not counted in the byte budget")
            if not self.calib:
                raise SettingsError("a size target needs calibration images (--calib DIR, calib=DIR): each layer's "
                                    "harm is measured on them")
        put("bits", check_bits(self.bits))
        if self.keep is not None:
            put("keep", parse_keep(self.keep))
            bad = [k for k in self.keep if k not in KEEP_CHOICES]
            if bad:
                raise SettingsError(f"keep must be a subset of {', '.join(KEEP_CHOICES)} (or none), got {bad[0]!r}")
        if self.keep_bits is not None:
            put("keep_bits", check_bits(self.keep_bits, "keep bits"))
        put("skip", tuple(n.strip() for n in self.skip.split(",") if n.strip()) if isinstance(self.skip, str)
            else tuple(self.skip or ()))
        put("mean", parse_floats(IMAGENET_MEAN if self.mean is None else self.mean, what="mean"))
        put("std", parse_floats(IMAGENET_STD if self.std is None else self.std, what="std"))
        if self.input_size is not None:
            put("input_size", _int(self.input_size, "input size", 1))
        if isinstance(self.crop_ratio, bool) or not isinstance(self.crop_ratio, (int, float)):
            raise SettingsError(f"crop ratio must be a number in [0.1, 1], got {self.crop_ratio!r}")
        put("crop_ratio", float(self.crop_ratio))
        self.preprocess  # noqa: B018 (checks size, crop ratio, mean and std)
        if self.act_bits is not None:
            if isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS:
                raise SettingsError(f"act_bits must be one of {', '.join(map(str, ACT_BITS))} (or None for float "
                                    f"activations), got {self.act_bits!r}")
            put("act_bits", int(self.act_bits))
        _choice(self.act_calib, CALIB_METHODS, "activation calibration (act_calib)")
        _choice(self.adapter_layout, ADAPTER_LAYOUTS, "adapter layout")
        _choice(self.out_format, OUT_FORMATS, "output format")
        if self.act_bits is not None and not self.calib:
            raise SettingsError("integer activations (--act-bits 8, act_bits=8) need calibration images (--calib DIR, "
                                  "calib=DIR)")
        layout = weight_layout_for(self.weight_layout, self.act_bits, self.out_format)
        if self.adapter_layout == "merge" and self.act_bits is None and layout != "decode":
            raise SettingsError("adapter layout merge with float activations needs weight layout decode: the adapters "
                                "are merged into the weights when ONNX Runtime loads the file")
        put("batch_size", _int(self.batch_size, "batch size", 1))
        put("parity_images", _int(self.parity_images, "parity images", 1))
        put("latency_runs", _int(self.latency_runs, "latency runs", 0, " (0 skips the timing)"))
        if self.latency_batch is not None:
            put("latency_batch", _int(self.latency_batch, "latency batch", 1))
        if self.threads is not None:
            put("threads", _int(self.threads, "threads", 1))
        put("seed", _int(self.seed, "seed", 0))
        for p in self.calib:
            check_input_dir(p, "calibration folder")
        for p in self.val:
            check_input_dir(p, "validation folder")
        if self.class_map is not None:
            check_input_file(self.class_map, "class map")
        for name, what in (("out", "output model"), ("report", "report"), ("plan_out", "plan"),
                           ("float_out", "float model")):
            if getattr(self, name) is not None:
                check_output_path(getattr(self, name), what)


def _rebuild(cls: type, values: dict) -> RunOptions:
    return cls(**values)


def _paths(value) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (Path(value),)
    return tuple(Path(v) for v in value)


def _int(value, what: str, low: int, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SettingsError(f"{what} must be an integer >= {low}{note}, got {value!r}")
    if value < low:
        raise SettingsError(f"{what} must be >= {low}{note}, got {value!r}")
    return int(value)


def _choice(value, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise SettingsError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
