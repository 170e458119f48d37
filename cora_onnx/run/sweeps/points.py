"""A sweep's points: `Point`, the [grid] and [[points]] entries expanded and checked (each point's
method settings built as quantize will), and a point's quantize arguments."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping


from cora_onnx.core.errors import SettingsError, WEIGHT_BITS
from cora_onnx.core.options import RunOptions

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")
_TARGETS = ("target_ratio", "target_size")  # grid axes and point keys: the point then runs a size-targeted search


@dataclass(frozen=True)
class Point:
    """One job: method, weight bits (None for methods without a bit width, e.g. pq), activation
    bits (None: float), options as given (method settings fields, and run options such as
    keep/keep_bits/skip, act_calib, adapter_layout: see point_options); name: the output subfolder, derived from the rest unless given; where: the
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



def _int(value, where: str, expected: str, ok=lambda v: True):
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise SettingsError(f"{where}: must be {expected}, got {value!r}")
    return value


def _methods():
    from cora_onnx.torch.search import METHODS

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
    from cora_onnx.onnx.int8 import ACT_BITS

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
    if isinstance(options.get("target_ratio"), (int, float)):
        parts.append(f"{options['target_ratio']:g}x")
    if isinstance(options.get("target_size"), (str, int)):
        parts.append(re.sub(r"[^A-Za-z0-9.]", "", str(options["target_size"])))
    rest = {k: v for k, v in options.items() if k not in ("budget", *_TARGETS)}
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
    bad = sorted(set(grid) - {"method", "bits", "act_bits", "budget", *_TARGETS})
    if bad:
        raise SettingsError(f"grid.{bad[0]}: unknown grid axis (grid takes method, bits, act_bits, budget, "
                            "target_ratio, target_size; other options go in [options.<method>] or [[points]])")

    def axis(key, required):
        v = grid.get(key)
        if v is None:
            if required:
                raise SettingsError(f"grid.{key}: required (a list)")
            return None
        if not isinstance(v, list) or not v:
            raise SettingsError(f"grid.{key}: must be a non-empty list, got {v!r}")
        return v

    targets = [(k, v) for k in _TARGETS for v in (axis(k, False) or [])]
    methods = [_method_name(m, f"grid.method[{i}]") for i, m in enumerate(axis("method", not targets) or ["auto"])]
    bits_axis = axis("bits", not targets and any(_takes_bits(m) for m in methods))
    for i, b in enumerate(bits_axis or []):
        _int(b, f"grid.bits[{i}]", "an integer from 2 to 8", lambda v: v in WEIGHT_BITS)
    acts = [_act_bits(a, f"grid.act_bits[{i}]") for i, a in enumerate(axis("act_bits", False) or [0])]
    budgets = axis("budget", False)
    points = []
    for m in methods:
        has_budget = "budget" in {f.name for f in dataclasses.fields(_methods()[m].settings)}
        for b in (bits_axis if _takes_bits(m) and not targets else [None]):
            for a in acts:
                for bud in (budgets if budgets and has_budget and not targets else [None]):
                    for tk, tv in (targets or [(None, None)]):  # a size target: the options are auto's
                        opts = dict(defaults.get("auto" if tk else m, {}))
                        if bud is not None:
                            opts["budget"] = bud
                        if tk is not None:
                            opts[tk] = tv
                        where = f"grid[method={m}" + (f",bits={b}" if b is not None else "") + \
                            (f",act_bits={a}" if a else "") + (f",budget={bud}" if bud is not None else "") + \
                            (f",{tk}={tv}" if tk else "") + "]"
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
        targeted = any(k in raw for k in _TARGETS)
        if targeted and raw.get("bits") is not None:
            raise SettingsError(f"{where}.bits: a point with a size target has no bit width (leave bits out)")
        bits = None if targeted else _bits(method, raw.pop("bits", None), f"{where}.bits")
        raw.pop("bits", None)
        act = _act_bits(raw.pop("act_bits", None), f"{where}.act_bits")
        name = raw.pop("name", None)
        out.append(_make_point(method, bits, act, {**defaults.get("auto" if targeted else method, {}), **raw}, name,
                               where))
    return out


# run options every point of a sweep shares (its data, preprocessing, verification, outputs) or
# that a point sets by its own keys (method, bits, act_bits); a point may set any other run option
_SWEEP_WIDE = frozenset({"calib", "val", "class_map", "input_size", "crop_ratio", "mean", "std", "out", "report",
                         "plan_out", "float_out", "model_name", "batch_size", "parity_images", "latency_runs",
                         "latency_batch", "threads", "seed", "method", "bits", "act_bits", "method_options"})


def point_options(p: Point, base: RunOptions) -> RunOptions:
    """The point's run options: the sweep's `base` with the point's method, bits, activations, run
    options (keep, keep_bits, skip, act_calib, adapter_layout, ...) and method options (settings
    fields; strings parsed as the command line parses them). SettingsError naming the entry."""
    m = _methods()[_search_of(p)]
    run_fields = {f.name for f in dataclasses.fields(RunOptions)} - _SWEEP_WIDE
    fields = {f.name for f in dataclasses.fields(m.settings)} - {"bits", "selection"}
    convert = {o.field: o.convert for o in m.options if o.convert is not None}
    given, method_options = {}, {}
    for k, v in p.options.items():
        if k in run_fields:
            given[k] = v
        elif k in fields:
            method_options[k] = convert[k](v) if k in convert and isinstance(v, str) else v
        else:
            raise SettingsError(f"{p.where}.{k}: method {_search_of(p)} has no option {k!r}; its options: "
                                f"{', '.join(sorted(fields | run_fields))}")
    try:
        return base.replace(method=p.method, bits=p.bits if p.bits is not None else 4, act_bits=p.act_bits,
                            method_options=method_options, **given)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{p.where}: {str(exc).splitlines()[0]}") from None


def _search_of(p: Point) -> str:
    """The search a point runs: the size-targeted one ("auto") when it has a target."""
    return "auto" if any(p.options.get(k) is not None for k in _TARGETS) else p.method


def _check_point(p: Point, base: RunOptions) -> None:
    """Build the point's run options and method settings as quantize will, and check them."""
    from cora_onnx.run.stages import check_options

    if _methods()[_search_of(p)].needs_calib and not base.calib:
        raise SettingsError(f"{p.where}.method: {p.method} needs calibration images (set calib)")
    opts = point_options(p, base)
    try:
        check_options(opts)
    except SettingsError as exc:
        raise SettingsError(f"{p.where}: {exc}") from None
