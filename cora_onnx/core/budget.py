"""Size targets and the exact choice of one option per layer under a byte budget (no torch).

`SizeTarget` is what the user asks for: a ratio to the float ONNX file (`--target-ratio 10`) or
a size (`--target-size 1.9MB`); `limit` turns it into bytes once the float file is known.

`choose` solves the multiple-choice knapsack behind every per-layer choice of the tool: each
layer takes exactly one of its options, each option has an integer cost (bytes or bits) and a harm;
the least summed harm whose summed cost stays within the budget. It keeps, layer after layer, the
Pareto frontier of (cost, harm) of the layers seen so far (a point survives only when no other
point is at most as costly and at most as harmful), dropping points that cannot be completed
within the budget by the cheapest options of the layers still to come. Nothing else is dropped, so
the result is the exact optimum and `Choice.exact` says so. Only a frontier longer than
`max_points` is thinned (the least harmful point of each cost bin, still within the budget); the
choice is then near-optimal and `Choice.lower_bound` bounds how near (the Lagrangian dual).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Hashable, Mapping

import numpy as np

from cora_onnx.core.errors import SettingsError

__all__ = ["SizeTarget", "parse_size", "format_size", "Choice", "choose", "least_cost"]

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)


def parse_size(text: Any, what: str = "target size") -> int:
    """"1.9MB", "1900kB", "1.5MiB", "1900000" (bytes) -> whole bytes (rounded down: a file of that
    many bytes is within the size asked for). kB/MB/GB are powers of 10, KiB/MiB/GiB of 2."""
    if isinstance(text, bool):
        raise SettingsError(f"{what} must be a size such as 1.9MB, 800kB or 1500000 (bytes), got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise SettingsError(f"{what} must be a size such as 1.9MB, 800kB or 1500000 (bytes), got {text!r}")
        value, unit = float(m.group(1)), (m.group(2) or "").lower()
    size = math.floor(value * _UNITS[unit]) if math.isfinite(value) else 0
    if size < 1:
        raise SettingsError(f"{what} must be at least 1 byte, got {text!r}")
    return int(size)


def format_size(n: float) -> str:
    """Bytes for people: 1,866,004 -> "1.866 MB", 84,500 -> "84.5 kB"."""
    if n >= 1e6:
        return f"{n / 1e6:.3f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class SizeTarget:
    """The file size asked for: `ratio` (the float ONNX file's bytes / ratio, > 1) or `size`
    (bytes), exactly one of them."""

    ratio: float | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.size is None):
            raise SettingsError("give one size target: a target ratio or a target size, not both")
        if self.ratio is not None:
            r = self.ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 1:
                raise SettingsError(f"target ratio must be a number above 1 (the float file's size / the file's), "
                                    f"got {r!r}")
            object.__setattr__(self, "ratio", float(r))
        else:
            object.__setattr__(self, "size", parse_size(self.size))

    @classmethod
    def of(cls, ratio: Any = None, size: Any = None) -> "SizeTarget | None":
        """The target of quantize's target_ratio / target_size arguments (None when neither is given)."""
        if ratio is None and size is None:
            return None
        return cls(ratio=ratio, size=None if size is None else parse_size(size))

    def limit(self, float_bytes: int) -> int:
        """The largest file allowed, in bytes."""
        return int(math.floor(float_bytes / self.ratio)) if self.ratio is not None else int(self.size)

    def describe(self) -> str:
        return f"{self.ratio:g}x" if self.ratio is not None else format_size(self.size)

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "size": self.size}


@dataclass(frozen=True)
class Choice:
    """The result of `choose`: option per layer, its summed cost and harm, the largest frontier
    met; lower_bound: None when the choice is the exact optimum, else (a frontier was thinned) a
    lower bound of the optimal harm."""

    options: Mapping[Hashable, Hashable]
    cost: int
    harm: float
    frontier: int
    lower_bound: float | None = None

    @property
    def exact(self) -> bool:
        return self.lower_bound is None


def least_cost(cost: Mapping[Hashable, Mapping[Hashable, int]]) -> int:
    """The smallest total: every layer at its cheapest option."""
    return int(sum(min(c.values()) for c in cost.values()))


def choose(harm: Mapping[Hashable, Mapping[Hashable, float]], cost: Mapping[Hashable, Mapping[Hashable, int]],
           budget: int, max_points: int = 400_000) -> Choice:
    """One option per layer (the keys of harm[layer]; cost[layer] has the same keys, integer costs)
    with the least summed harm whose summed cost is at most `budget` (see the module doc).
    SettingsError when even the cheapest options exceed the budget."""
    names = list(harm)
    for n in names:
        if not harm[n] or set(harm[n]) != set(cost[n]):
            raise ValueError(f"layer {n!r}: harm and cost must name the same, non-empty options")
    least = least_cost({n: cost[n] for n in names})
    if least > budget:
        raise SettingsError(f"no choice fits the budget: the cheapest options cost {least}, the budget is {budget}")
    return _frontier_choice(names, harm, cost, budget, max_points)


def _frontier_choice(names, harm, cost, cap: int, max_points: int) -> Choice:
    """The DP of `choose`; a frontier longer than max_points keeps the least harmful point of each
    of max_points equal cost bins (then `Choice.thinned`)."""
    opts = {n: list(harm[n]) for n in names}
    c_of = {n: np.array([int(cost[n][o]) for o in opts[n]], dtype=np.int64) for n in names}
    h_of = {n: np.array([float(harm[n][o]) for o in opts[n]], dtype=np.float64) for n in names}
    # the cheapest completion of the layers after each one, so hopeless points go early
    rest = np.zeros(len(names) + 1, dtype=np.int64)
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + int(c_of[names[i]].min())
    total = np.zeros(1, dtype=np.int64)
    value = np.zeros(1, dtype=np.float64)
    back = []
    largest = 1
    thinned = False
    for i, n in enumerate(names):
        k = len(opts[n])
        c = (total[None, :] + c_of[n][:, None]).reshape(-1)
        v = (value[None, :] + h_of[n][:, None]).reshape(-1)
        pick = np.repeat(np.arange(k), len(total))
        parent = np.tile(np.arange(len(total)), k)
        ok = c + rest[i + 1] <= cap
        c, v, pick, parent = c[ok], v[ok], pick[ok], parent[ok]
        order = np.lexsort((v, c))  # by cost, then harm
        c, v, pick, parent = c[order], v[order], pick[order], parent[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], v[:-1]]))
        keep = v < best_before  # strictly less harm than every cheaper (or equally cheap, earlier) point
        c, v, pick, parent = c[keep], v[keep], pick[keep], parent[keep]
        largest = max(largest, len(c))
        if len(c) > max_points:  # harm falls with cost along the frontier: each bin's last point is its best
            bins = (c * max_points) // max(cap, 1)
            last = np.ones(len(c), bool)
            last[:-1] = bins[1:] != bins[:-1]
            c, v, pick, parent = c[last], v[last], pick[last], parent[last]
            thinned = True
        total, value = c, v
        back.append((pick, parent))
    j = int(np.argmin(value))
    chosen = {}
    for n, (pick, parent) in zip(reversed(names), reversed(back)):
        chosen[n] = opts[n][int(pick[j])]
        j = int(parent[j])
    options = {n: chosen[n] for n in names}
    return Choice(options=options, cost=int(sum(int(cost[n][options[n]]) for n in names)),
                  harm=float(sum(float(harm[n][options[n]]) for n in names)), frontier=largest,
                  lower_bound=_lagrangian_bound(c_of, h_of, cap) if thinned else None)


def _lagrangian_bound(c_of: dict, h_of: dict, cap: int) -> float:
    """A lower bound of the least summed harm within `cap` (the Lagrangian dual of the budget,
    max over lam >= 0 of sum_l min_o (h + lam c) - lam cap, at every slope where some layer's best
    option changes): how far a thinned choice can be from the optimum."""
    slopes = {0.0}
    for n in c_of:
        c, h = c_of[n], h_of[n]
        dc, dh = c[:, None] - c[None, :], h[None, :] - h[:, None]
        ok = dc > 0
        slopes.update((dh[ok] / dc[ok]).clip(min=0).tolist())
    best = -np.inf
    for lam in sorted(slopes):
        best = max(best, sum(float((h_of[n] + lam * c_of[n]).min()) for n in c_of) - lam * cap)
    return float(best)
