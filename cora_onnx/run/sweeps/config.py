"""A sweep config: read (TOML, or YAML with PyYAML) and validated into a `SweepConfig` before any job
starts; the names of the files of a sweep folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


from cora_onnx.core.errors import CoraError, InputError, SettingsError
from cora_onnx.core.files import check_input_dir, check_input_file
from cora_onnx.core.options import RunOptions
from cora_onnx.run.sweeps.points import (Point, _check_point, _grid_points, _int, _listed_points, _method_defaults,
                                         point_options)

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
    options: RunOptions | None = None  # what every point shares: data, preprocessing, verification

    def point_options(self, p: Point) -> RunOptions:
        """The run options of point p (checked when the config was loaded)."""
        return point_options(p, self.options)

    def setup_json(self) -> dict:
        """What every point of a sweep folder shares: a rerun into the folder must match it."""
        w = self.weights.stat()
        return {"model": self.arch, "weights": str(self.weights), "weights_bytes": w.st_size,
                "calib": str(self.calib) if self.calib else None, "val": str(self.val),
                "class_map": str(self.class_map) if self.class_map else None, "input_size": self.input_size,
                "crop_ratio": self.crop_ratio, "mean": list(self.mean), "std": list(self.std),
                **{k: self.run[k] for k in ("batch_size", "parity_images", "threads", "torch_threads", "seed")}}



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


def _path(value, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{where}: must be a path (string), got {value!r}")
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _packaged(arch: str) -> Path:
    """The weights a package brings for `arch` (efficientnet_lite0/1/2), when the config names none."""
    from cora_onnx.torch.models import packaged_weights

    try:
        weights = packaged_weights(arch)
    except FileNotFoundError as exc:
        raise SettingsError(f"weights: required for {arch} unless its weights package is installed ({exc})") from None
    if weights is None:
        raise SettingsError(f"weights: required for {arch} (no installed package brings its weights)")
    return weights


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
    from cora_onnx.onnx.data import load_class_map, parse_floats
    from cora_onnx.torch.models import default_input_size, default_normalization, list_architectures

    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (known: {', '.join(sorted(_TOP))})")
    given = {k: data[k] for k in ("model", "weights", "calib", "val") if k in data}
    if not given:
        from cora_onnx.torch.embedded import digits_default

        d = digits_default()
        arch, weights, calib, val = d.arch, d.weights, d.calib_dir, d.val_dir
        input_size, mean, std = d.input_size, d.mean, d.std
        log.info("no model given: using the embedded default (%s on scikit-learn digits)", d.arch)
    else:
        if "model" not in data:
            raise SettingsError("model: required (with model, weights, calib and val all absent the embedded "
                                "default is used)")
        arch = data["model"]
        if not isinstance(arch, str) or arch not in list_architectures():
            raise SettingsError(f"model: unknown architecture {arch!r} (a torchvision classification architecture, "
                                "efficientnet_lite0 or digits_cnn)")
        weights = _path(data["weights"], base, "weights") if "weights" in data else _packaged(arch)
        calib = _path(data["calib"], base, "calib") if "calib" in data else None
        if "val" not in data:
            raise SettingsError("val: required: agreement, KL and top-1 are measured on a labelled folder")
        val = _path(data["val"], base, "val")
        input_size, (mean, std) = default_input_size(arch), default_normalization(arch)
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
    base = RunOptions(calib=calib, val=val, class_map=class_map, input_size=input_size, crop_ratio=crop_ratio,
                      mean=mean, std=std, model_name=arch,
                      **{k: run[k] for k in ("batch_size", "parity_images", "latency_runs", "threads", "seed")})
    seen: dict[str, str] = {}
    for p in points:
        if p.name in seen:
            raise SettingsError(f"{p.where}: the same point as {seen[p.name]} (name {p.name}); give a distinct name")
        seen[p.name] = p.where
        _check_point(p, base)
    return SweepConfig(arch=arch, weights=Path(weights), calib=Path(calib) if calib else None, val=Path(val),
                       class_map=class_map, input_size=input_size, crop_ratio=float(crop_ratio), mean=tuple(mean),
                       std=tuple(std), run=run, points=tuple(points), out=out, source=src, options=base)
