"""Sweeps: one model and its data, many points (method, bits, activation bits, method options),
each point one `quantize` run; results in one JSONL file, a table, a PNG and an HTML page.

A sweep config (TOML, or YAML when PyYAML is installed) holds the model and its data as for
`quantize`, then `[grid]` (method x bits x act_bits x budget) and/or `[[points]]`, and
`[options.<method>]` tables of method options applied to every point of that method:

    model = "resnet18"                      # omit model/weights/calib/val: the embedded default
    weights = "resnet18.pt"                 # relative paths: relative to the config file
    calib = "calib"
    val = "val"
    class_map = "class_map.json"
    crop_ratio = 0.875
    latency_runs = 5                        # per point (replaced by the final interleaved run)
    final_latency_runs = 50
    [options.cora]
    iters = 100
    [grid]
    method = ["rtn"]
    bits = [4, 8]
    [[points]]
    method = "cora"
    bits = 4
    budget = 0.05
    act_bits = 8

The whole config is validated before any job starts (SettingsError / InputError naming the
entry, e.g. "points[2].bits: ..."). The float reference (float ONNX file and the float model's
logits on the validation images) is computed once and handed to every point. Points whose
report exists are skipped (a rerun resumes); a point that fails is recorded with its one-line
error and the sweep goes on. Executors: "inprocess" (one point after another) or "ray" (one
Ray task per point, on a local Ray or an existing cluster; data paths must be readable on the
workers, the driver writes every output file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import CoraError, InputError, SettingsError, WEIGHT_BITS
from .io import atomic_write, check_input_dir, check_input_file

__all__ = ["Point", "SweepConfig", "SweepResult", "load_config", "sweep", "EXECUTORS", "RESULTS_NAME"]

log = logging.getLogger(__name__)

EXECUTORS = ("inprocess", "ray")
RESULTS_NAME = "results.jsonl"
REPORT_NAME = "report.json"
MODEL_NAME = "model.onnx"
FLOAT_NAME = "float.onnx"
REFERENCE_NAME = "reference.npz"
SETUP_NAME = "sweep.json"

# run settings: name -> (default, check, expected)
_RUN = {
    "batch_size": (32, lambda v: v >= 1, "an integer >= 1"),
    "parity_images": (1000, lambda v: v >= 1, "an integer >= 1"),
    "latency_runs": (5, lambda v: v >= 1, "an integer >= 1"),
    "final_latency_runs": (30, lambda v: v >= 1, "an integer >= 1"),
    "threads": (None, lambda v: v >= 1, "an integer >= 1 (ONNX Runtime threads)"),
    "torch_threads": (None, lambda v: v >= 1, "an integer >= 1 (torch threads of each point's search)"),
    "seed": (0, lambda v: v >= 0, "an integer >= 0"),
}
_DATA = ("model", "weights", "calib", "val", "class_map", "input_size", "crop_ratio", "mean", "std")
_TOP = set(_DATA) | set(_RUN) | {"out", "grid", "points", "options"}
_QUANTIZE_ARGS = ("act_calib", "adapter_layout")  # per-point quantize arguments besides method options
_SELECTION = ("keep", "keep_bits", "skip")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")


@dataclass(frozen=True)
class Point:
    """One job: method, weight bits (None for methods without a bit width, e.g. pq), activation
    bits (None: float), options as given (method settings fields, keep/keep_bits/skip, act_calib,
    adapter_layout); name: the output subfolder, derived from the rest unless given; where: the
    config entry it came from, for messages."""

    name: str
    method: str
    bits: int | None
    act_bits: int | None
    options: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""

    def to_json(self) -> dict:
        return {"point": self.name, "method": self.method, "bits": self.bits, "act_bits": self.act_bits,
                "options": dict(self.options)}


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: model and data (absolute paths), run settings, the points in order."""

    arch: str
    weights: Path
    calib: Path | None
    val: Path
    class_map: Path | None
    input_size: int
    crop_ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    run: Mapping[str, Any]
    points: tuple[Point, ...]
    out: Path | None = None
    source: str = "config"

    def setup_json(self) -> dict:
        """What every point of a sweep folder shares: a rerun into the folder must match it."""
        w = self.weights.stat()
        return {"model": self.arch, "weights": str(self.weights), "weights_bytes": w.st_size,
                "calib": str(self.calib) if self.calib else None, "val": str(self.val),
                "class_map": str(self.class_map) if self.class_map else None, "input_size": self.input_size,
                "crop_ratio": self.crop_ratio, "mean": list(self.mean), "std": list(self.std),
                **{k: self.run[k] for k in ("batch_size", "parity_images", "threads", "torch_threads", "seed")}}


@dataclass(frozen=True)
class SweepResult:
    """rows: one summary dict per point (and "float" first), latency from the final interleaved run;
    files: name -> path of what was written (results, table, summary, png, html)."""

    out: Path
    rows: tuple[dict, ...]
    table: str
    files: Mapping[str, Path]
    ran: tuple[str, ...]


# ---- config --------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    check_input_file(path, "sweep config")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SettingsError(f"sweep config {path}: YAML needs PyYAML, which is not installed; "
                                "write the config in TOML") from None
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SettingsError(f"sweep config {path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"sweep config {path} is not valid TOML: {str(exc).splitlines()[0]}") from None
    else:
        raise SettingsError(f"sweep config {path}: expected a .toml (or .yaml) file")
    if not isinstance(data, dict):
        raise SettingsError(f"sweep config {path}: expected a table of settings at the top level")
    return data


def _int(value, where: str, expected: str, ok=lambda v: True):
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise SettingsError(f"{where}: must be {expected}, got {value!r}")
    return value


def _path(value, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{where}: must be a path (string), got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def load_config(config: str | os.PathLike | Mapping[str, Any], base: str | os.PathLike | None = None) -> SweepConfig:
    """Parse and validate a sweep config (a file path, or a dict with paths relative to `base`,
    default the current folder). Every point's settings are built once here, so nothing that can
    be checked without running is left to a job."""
    if isinstance(config, Mapping):
        data, src, base_dir = dict(config), "config", Path(base or ".").resolve()
    else:
        path = Path(config)
        data, src, base_dir = _read_config(path), path.name, path.resolve().parent
    try:
        return _validate(data, base_dir, src)
    except CoraError as exc:
        raise type(exc)(f"{src}: {exc}") from None


def _validate(data: dict, base: Path, src: str) -> SweepConfig:
    from .data import load_class_map, parse_floats
    from .models import default_normalization, list_architectures

    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (known: {', '.join(sorted(_TOP))})")
    given = {k: data[k] for k in ("model", "weights", "calib", "val") if k in data}
    if not given:
        from .embedded import digits_default

        d = digits_default()
        arch, weights, calib, val = d.arch, d.weights, d.calib_dir, d.val_dir
        input_size, mean, std = d.input_size, d.mean, d.std
        log.info("no model given: using the embedded default (%s on scikit-learn digits)", d.arch)
    else:
        if "model" not in data or "weights" not in data:
            raise SettingsError(f"{'weights' if 'model' in data else 'model'}: required (with model, weights, calib "
                                "and val all absent the embedded default is used)")
        arch = data["model"]
        if not isinstance(arch, str) or arch not in list_architectures():
            raise SettingsError(f"model: unknown architecture {arch!r} (a torchvision classification architecture, "
                                "efficientnet_lite0 or digits_cnn)")
        weights = _path(data["weights"], base, "weights")
        calib = _path(data["calib"], base, "calib") if "calib" in data else None
        if "val" not in data:
            raise SettingsError("val: required: agreement, KL and top-1 are measured on a labelled folder")
        val = _path(data["val"], base, "val")
        input_size, (mean, std) = 224, default_normalization(arch)
    for key, what, check in (("weights", weights, check_input_file), ("calib", calib, check_input_dir),
                             ("val", val, check_input_dir)):
        if what is not None:
            try:
                check(what, key)
            except InputError as exc:
                raise InputError(f"{key}: {exc}") from None
    class_map = _path(data["class_map"], base, "class_map") if "class_map" in data else None
    if class_map is not None:
        try:
            load_class_map(class_map)
        except CoraError as exc:
            raise type(exc)(f"class_map: {exc}") from None
    input_size = _int(data.get("input_size", input_size), "input_size", "an integer >= 1", lambda v: v >= 1)
    crop_ratio = data.get("crop_ratio", 1.0)
    if isinstance(crop_ratio, bool) or not isinstance(crop_ratio, (int, float)) or not 0 < crop_ratio <= 1:
        raise SettingsError(f"crop_ratio: must be a number in (0, 1], got {crop_ratio!r}")
    try:
        mean = parse_floats(data.get("mean", mean), what="mean")
        std = parse_floats(data.get("std", std), what="std")
    except CoraError as exc:
        raise SettingsError(f"{'mean' if 'mean' in str(exc) else 'std'}: {exc}") from None
    run = {}
    for key, (default, ok, expected) in _RUN.items():
        v = data.get(key, default)
        run[key] = v if v is None else _int(v, key, expected, ok)
    out = _path(data["out"], base, "out") if "out" in data else None
    defaults = _method_defaults(data.get("options", {}))
    points = _grid_points(data.get("grid"), defaults) + _listed_points(data.get("points", []), defaults)
    if not points:
        raise SettingsError("no points: give a [grid] (method = [...], bits = [...]) or [[points]] entries")
    seen: dict[str, str] = {}
    for p in points:
        if p.name in seen:
            raise SettingsError(f"{p.where}: the same point as {seen[p.name]} (name {p.name}); give a distinct name")
        seen[p.name] = p.where
        _check_point(p, calib is not None)
    return SweepConfig(arch=arch, weights=Path(weights), calib=Path(calib) if calib else None, val=Path(val),
                       class_map=class_map, input_size=input_size, crop_ratio=float(crop_ratio), mean=tuple(mean),
                       std=tuple(std), run=run, points=tuple(points), out=out, source=src)


def _methods():
    from .search import METHODS

    return METHODS


def _takes_bits(method: str) -> bool:
    """Methods whose settings default `bits` to None (pq) have no weight bit width."""
    f = {f.name: f for f in dataclasses.fields(_methods()[method].settings)}["bits"]
    return f.default is not None


def _method_name(value, where: str) -> str:
    if value not in _methods():
        raise SettingsError(f"{where}: unknown method {value!r}; expected one of {', '.join(_methods())}")
    return value


def _method_defaults(options) -> dict[str, dict]:
    if not isinstance(options, Mapping):
        raise SettingsError("options: must be a table of [options.<method>] tables")
    out = {}
    for method, opts in options.items():
        _method_name(method, f"options.{method}")
        if not isinstance(opts, Mapping):
            raise SettingsError(f"options.{method}: must be a table of option = value")
        out[method] = {_key(k): v for k, v in opts.items()}
    return out


def _key(k: str) -> str:
    return str(k).replace("-", "_")


def _act_bits(value, where: str) -> int | None:
    from .int8 import ACT_BITS

    if value in (None, 0, False, "none", "float"):
        return None
    if isinstance(value, bool) or value not in ACT_BITS:
        raise SettingsError(f"{where}: must be {' or '.join(map(str, ACT_BITS))} (integer activations) or 0 "
                            f"(float activations), got {value!r}")
    return int(value)


def _bits(method: str, value, where: str) -> int | None:
    if not _takes_bits(method):
        if value is not None:
            raise SettingsError(f"{where}: method {method} has no weight bit width (leave bits out)")
        return None
    if value is None:
        raise SettingsError(f"{where}: required for method {method} (an integer from 2 to 8)")
    return _int(value, where, "an integer from 2 to 8", lambda v: v in WEIGHT_BITS)


def _point_name(method: str, bits: int | None, act_bits: int | None, options: Mapping[str, Any]) -> str:
    parts = [method] + ([f"w{bits}"] if bits is not None else []) + ([f"a{act_bits}"] if act_bits else [])
    if isinstance(options.get("budget"), (int, float)):
        parts.append(f"b{options['budget']:g}")
    rest = {k: v for k, v in options.items() if k != "budget"}
    if rest:
        parts.append(hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8])
    return "-".join(parts)


def _make_point(method: str, bits, act_bits, options: dict, name, where: str) -> Point:
    if name is None:
        name = _point_name(method, bits, act_bits, options)
    elif not isinstance(name, str) or not _NAME.match(name) or name == "float":
        raise SettingsError(f"{where}.name: must be letters, digits and ._+=- (not 'float'), got {name!r}")
    return Point(name=name, method=method, bits=bits, act_bits=act_bits, options=options, where=where)


def _grid_points(grid, defaults: dict) -> list[Point]:
    if grid is None:
        return []
    if not isinstance(grid, Mapping):
        raise SettingsError("grid: must be a table (method = [...], bits = [...], act_bits = [...], budget = [...])")
    bad = sorted(set(grid) - {"method", "bits", "act_bits", "budget"})
    if bad:
        raise SettingsError(f"grid.{bad[0]}: unknown grid axis (grid takes method, bits, act_bits, budget; "
                            "other options go in [options.<method>] or [[points]])")

    def axis(key, required):
        v = grid.get(key)
        if v is None:
            if required:
                raise SettingsError(f"grid.{key}: required (a list)")
            return None
        if not isinstance(v, list) or not v:
            raise SettingsError(f"grid.{key}: must be a non-empty list, got {v!r}")
        return v

    methods = [_method_name(m, f"grid.method[{i}]") for i, m in enumerate(axis("method", True))]
    bits_axis = axis("bits", any(_takes_bits(m) for m in methods))
    for i, b in enumerate(bits_axis or []):
        _int(b, f"grid.bits[{i}]", "an integer from 2 to 8", lambda v: v in WEIGHT_BITS)
    acts = [_act_bits(a, f"grid.act_bits[{i}]") for i, a in enumerate(axis("act_bits", False) or [0])]
    budgets = axis("budget", False)
    points = []
    for m in methods:
        has_budget = "budget" in {f.name for f in dataclasses.fields(_methods()[m].settings)}
        for b in (bits_axis if _takes_bits(m) else [None]):
            for a in acts:
                for bud in (budgets if budgets and has_budget else [None]):
                    opts = dict(defaults.get(m, {}))
                    if bud is not None:
                        opts["budget"] = bud
                    where = f"grid[method={m}" + (f",bits={b}" if b is not None else "") + \
                        (f",act_bits={a}" if a else "") + (f",budget={bud}" if bud is not None else "") + "]"
                    points.append(_make_point(m, b, a, opts, None, where))
    return points


def _listed_points(points, defaults: dict) -> list[Point]:
    if not isinstance(points, list):
        raise SettingsError("points: must be a list of tables ([[points]] entries)")
    out = []
    for i, raw in enumerate(points):
        where = f"points[{i}]"
        if not isinstance(raw, Mapping):
            raise SettingsError(f"{where}: must be a table (method = ..., bits = ..., options)")
        raw = {_key(k): v for k, v in raw.items()}
        if "method" not in raw:
            raise SettingsError(f"{where}.method: required")
        method = _method_name(raw.pop("method"), f"{where}.method")
        bits = _bits(method, raw.pop("bits", None), f"{where}.bits")
        act = _act_bits(raw.pop("act_bits", None), f"{where}.act_bits")
        name = raw.pop("name", None)
        out.append(_make_point(method, bits, act, {**defaults.get(method, {}), **raw}, name, where))
    return out


def _check_point(p: Point, has_calib: bool) -> None:
    """Build the point's method settings (as quantize will) and check its quantize arguments."""
    from .stages import check_run_options, make_settings

    m = _methods()[p.method]
    if m.needs_calib and not has_calib:
        raise SettingsError(f"{p.where}.method: {p.method} needs calibration images (set calib)")
    args = _quantize_args(p)
    try:
        check_run_options(act_bits=p.act_bits, has_calib=has_calib,
                          **{k: args[k] for k in ("act_calib", "adapter_layout") if k in args})
    except SettingsError as exc:
        raise SettingsError(f"{p.where}: {exc}") from None
    try:
        make_settings(p.method, p.bits if p.bits is not None else 4, _method_options(p))
    except SettingsError as exc:
        raise SettingsError(f"{p.where}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type inside a settings check
        raise SettingsError(f"{p.where}: an option has a value of the wrong type ({str(exc).splitlines()[0]})") from None


def _quantize_args(p: Point) -> dict:
    return {k: p.options[k] for k in _QUANTIZE_ARGS if k in p.options}


def _method_options(p: Point) -> dict:
    """The point's options as quantize's method options (settings fields, selection)."""
    from .search import LayerSelection
    from .search.layers import default_selection
    from .options import parse_keep

    m = _methods()[p.method]
    fields = {f.name for f in dataclasses.fields(m.settings)} - {"bits", "selection"}
    convert = {o.field: o.convert for o in m.options if o.convert is not None}
    out: dict[str, Any] = {}
    for k, v in p.options.items():
        if k in _QUANTIZE_ARGS or k in _SELECTION:
            continue
        if k not in fields:
            raise SettingsError(f"{p.where}.{k}: method {p.method} has no option {k!r}; its options: "
                                f"{', '.join(sorted(fields | set(_SELECTION) | set(_QUANTIZE_ARGS)))}")
        out[k] = convert[k](v) if k in convert and isinstance(v, str) else v
    if any(k in p.options for k in _SELECTION):
        d = default_selection(m.settings)
        keep = p.options.get("keep", d.keep)
        keep = parse_keep(keep) if isinstance(keep, str) else keep
        if not isinstance(keep, (list, tuple)):
            raise SettingsError(f"{p.where}.keep: a list or 'first,last', got {keep!r}")
        skip = p.options.get("skip", d.skip)
        try:
            out["selection"] = LayerSelection(keep=tuple(keep), keep_bits=p.options.get("keep_bits", d.keep_bits),
                                              skip=tuple([skip] if isinstance(skip, str) else skip))
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{p.where}.keep: {exc}") from None
    return out


# ---- one point -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Job:
    """Everything one point needs, picklable (it travels to Ray workers)."""

    point: Point
    arch: str
    weights: str
    data: Mapping[str, Any]
    run: Mapping[str, Any]
    float_logits: np.ndarray


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job(job: Job) -> dict:
    """Run one point through cora_onnx.quantize; never raises for a failing point. Returns
    {"status": "ok"|"failed", "report", "onnx" (bytes), "error", "seconds"}."""
    from .api import quantize
    from .models import build_model

    p, t0 = job.point, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cora-sweep-") as tmp, _torch_threads(job.run["torch_threads"]):
        out = Path(tmp) / MODEL_NAME
        try:
            res = quantize(build_model(job.arch, job.weights), **job.data, bits=p.bits if p.bits is not None else 4,
                           method=p.method, out=out, act_bits=p.act_bits, model_name=job.arch,
                           batch_size=job.run["batch_size"], parity_images=job.run["parity_images"],
                           latency_runs=job.run["latency_runs"], threads=job.run["threads"], seed=job.run["seed"],
                           float_logits=job.float_logits, **_quantize_args(p), **_method_options(p))
            return {"status": "ok", "report": res.report, "onnx": out.read_bytes(), "error": None,
                    "seconds": time.perf_counter() - t0}
        except CoraError as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except Exception as exc:  # a failing point must not stop the sweep: record it
            log.debug("point %s failed", p.name, exc_info=True)
            error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    return {"status": "failed", "report": None, "onnx": None, "error": error, "seconds": time.perf_counter() - t0}


def _ray_job(job: Job, log_level: int) -> dict:
    """The Ray task: the point's own progress lines go to the worker's stderr (Ray forwards them)."""
    root = logging.getLogger("cora_onnx")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[cora-onnx {job.point.name}] %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    root.propagate = False
    return run_job(job)


# ---- the sweep -----------------------------------------------------------------------------------
def _row(p: Point, result: dict, weight_params: int) -> dict:
    rep = result["report"] or {}
    ok = result["status"] == "ok"
    size = len(result["onnx"]) if ok else None
    fid = rep.get("fidelity_to_float", {})
    return {**p.to_json(), "status": result["status"], "onnx_bytes": size,
            "bits_per_weight": size * 8 / weight_params if ok else None,
            "agreement": fid.get("top1_agreement"), "kl": fid.get("kl_divergence"),
            "top1": rep.get("top1", {}).get("quantized_onnxruntime"),
            "latency_ms_b1": (rep.get("latency_ms") or {}).get("quantized"),
            "search_seconds": rep.get("search_seconds"), "seconds": result["seconds"], "error": result["error"]}


def _record(out: Path, p: Point, result: dict, weight_params: int) -> dict:
    """Write the point's ONNX file, then its report (the marker that the point is done), then
    append its row to the JSONL file."""
    from .report import write_report

    row = _row(p, result, weight_params)
    if result["status"] == "ok":
        folder = out / p.name
        folder.mkdir(exist_ok=True)
        atomic_write(folder / MODEL_NAME, lambda f: f.write(result["onnx"]))
        write_report({**result["report"], "onnx_path": str(folder / MODEL_NAME), "sweep_point": p.to_json()},
                     folder / REPORT_NAME)
    with open(out / RESULTS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


def _prepare_out(out: Path, cfg: SweepConfig) -> None:
    if not out.parent.is_dir():
        raise InputError(f"output folder {out}: directory {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is a file")
    out.mkdir(exist_ok=True)
    setup = cfg.setup_json()
    marker = out / SETUP_NAME
    if marker.is_file():
        try:
            before = json.loads(marker.read_text())
        except ValueError:
            before = None
        if before != setup:
            diff = sorted(k for k in set(setup) | set(before or {}) if (before or {}).get(k) != setup.get(k))
            raise SettingsError(f"output folder {out} holds a sweep of another model or data ({', '.join(diff)} "
                                "differ); use another output folder")
    else:
        atomic_write(marker, lambda f: f.write(json.dumps(setup, indent=2).encode() + b"\n"))


def _reference(cfg: SweepConfig, out: Path, model):
    """The float reference, computed once per sweep folder (kept as float.onnx + reference.npz)."""
    from .api import float_reference

    ref_file, float_file = out / REFERENCE_NAME, out / FLOAT_NAME
    if ref_file.is_file() and float_file.is_file():
        with np.load(ref_file) as z:
            log.info("float reference from %s", ref_file)
            return {"logits": z["logits"], "top1": float(z["top1"]), "weight_params": int(z["weight_params"])}
    log.info("float reference: %s on %s", cfg.arch, cfg.val)
    ref = float_reference(model, cfg.val, cfg.class_map, cfg.mean, cfg.std, cfg.input_size, crop_ratio=cfg.crop_ratio,
                          batch_size=cfg.run["batch_size"])
    atomic_write(float_file, lambda f: f.write(ref.onnx))
    atomic_write(ref_file, lambda f: np.savez(f, logits=ref.logits, labels=ref.labels, top1=ref.top1,
                                              weight_params=ref.weight_params))
    return {"logits": ref.logits, "top1": ref.top1, "weight_params": ref.weight_params}


def _jobs(cfg: SweepConfig, points, logits) -> list[Job]:
    data = {"calib": str(cfg.calib) if cfg.calib else None, "val": str(cfg.val),
            "class_map": str(cfg.class_map) if cfg.class_map else None, "mean": cfg.mean, "std": cfg.std,
            "input_size": cfg.input_size, "crop_ratio": cfg.crop_ratio}
    return [Job(p, cfg.arch, str(cfg.weights), data, dict(cfg.run), logits) for p in points]


def _run_inprocess(jobs: list[Job], record, total: int, done: int) -> None:
    for job in jobs:
        log.info("sweep: point %d/%d %s: start", done + 1, total, job.point.name)
        done += 1
        row = record(job.point, run_job(job))
        _log_done(row, done, total)


def _run_ray(jobs: list[Job], record, total: int, done: int, address: str | None) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # a local Ray whose workers import this same cora_onnx
            pkg_root = str(Path(__file__).resolve().parents[1])
            path = os.pathsep.join([pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ray.init(include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
        started = True
    try:
        level = logging.getLogger("cora_onnx").getEffectiveLevel()
        task = ray.remote(num_cpus=jobs[0].run["torch_threads"] or 1, max_retries=0)(_ray_job)
        pending = {task.remote(job, level): job for job in jobs}
        log.info("sweep: %d Ray tasks submitted", len(pending))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # the task itself died (worker lost, out of memory...)
                result = {"status": "failed", "report": None, "onnx": None, "seconds": None,
                          "error": f"Ray task failed: {(str(exc).strip().splitlines() or [''])[-1][:300]}"}
            done += 1
            _log_done(record(job.point, result), done, total)
    finally:
        if started:
            ray.shutdown()


def _log_done(row: dict, done: int, total: int) -> None:
    if row["status"] == "ok":
        log.info("sweep: %d/%d points done; %s: %.1f kB, agreement %.2f%%, %.1f s", done, total, row["point"],
                 row["onnx_bytes"] / 1e3, row["agreement"], row["seconds"] or 0)
    else:
        log.warning("sweep: %d/%d points done; %s FAILED: %s", done, total, row["point"], row["error"])


def read_rows(out: str | os.PathLike) -> dict[str, dict]:
    """The latest JSONL row of each point in a sweep folder."""
    rows: dict[str, dict] = {}
    path = Path(out) / RESULTS_NAME
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by an interrupted run
                    continue
                rows[row["point"]] = row
    return rows


def sweep(config: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike | None = None, *,
          executor: str = "inprocess", address: str | None = None, base: str | os.PathLike | None = None
          ) -> SweepResult:
    """Run every point of a sweep config (path or dict; see the module doc) into the folder `out`
    (default: the config's `out`, else sweep-<config name>). Points whose report exists are
    skipped. Ends with one interleaved latency run over the float model and every finished point,
    the table (table.txt), summary.json, sweep.png (with matplotlib) and sweep.html."""
    from .sweeps_report import write_outputs

    if executor not in EXECUTORS:
        raise SettingsError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if address and executor != "ray":
        raise SettingsError("address is for the Ray executor (executor='ray')")
    cfg = load_config(config, base)
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SettingsError("the Ray executor needs ray: pip install 'cora-onnx[ray]'") from None
    stem = Path(config).stem if not isinstance(config, Mapping) else "config"
    out = Path(out) if out is not None else (cfg.out or Path(f"sweep-{stem}"))
    from .models import build_model

    try:  # the last check of the weights, before any output
        model = build_model(cfg.arch, cfg.weights)
    except CoraError as exc:
        raise type(exc)(f"{cfg.source}: weights: {exc}") from None
    _prepare_out(out, cfg)
    done_before = [p for p in cfg.points if (out / p.name / REPORT_NAME).is_file()]
    todo = [p for p in cfg.points if p not in done_before]
    log.info("sweep: %d points, %d done before (skipped), %d to run (executor %s) -> %s", len(cfg.points),
             len(done_before), len(todo), executor, out)
    ref = _reference(cfg, out, model)

    def record(p: Point, result: dict) -> dict:
        return _record(out, p, result, ref["weight_params"])

    if todo:
        jobs = _jobs(cfg, todo, ref["logits"])
        if executor == "ray":
            _run_ray(jobs, record, len(cfg.points), len(done_before), address)
        else:
            _run_inprocess(jobs, record, len(cfg.points), len(done_before))
    rows = read_rows(out)
    for p in done_before:  # a report without a row (e.g. a row lost to an interrupted run): rebuild it
        if p.name not in rows or rows[p.name]["status"] != "ok":
            report = json.loads((out / p.name / REPORT_NAME).read_text())
            rows[p.name] = _record(out, p, {"status": "ok", "report": report, "error": None, "seconds": None,
                                             "onnx": (out / p.name / MODEL_NAME).read_bytes()}, ref["weight_params"])
    ordered = [rows[p.name] for p in cfg.points if p.name in rows]
    table, summary, files = write_outputs(out, cfg, ordered, ref)
    return SweepResult(out=out, rows=tuple(summary), table=table, files=files, ran=tuple(p.name for p in todo))
