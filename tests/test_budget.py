"""Size targets and the exact per-layer choice under a byte budget (cora_onnx/core/budget.py)."""

import itertools

import numpy as np
import pytest

from cora_onnx.core.budget import SizeTarget, choose, least_cost, parse_size
from cora_onnx.core.errors import SettingsError


def _brute(harm, cost, budget):
    """The best choice by enumerating every combination (small tables only)."""
    names = list(harm)
    best = None
    for combo in itertools.product(*(list(harm[n]) for n in names)):
        c = sum(cost[n][o] for n, o in zip(names, combo))
        v = sum(harm[n][o] for n, o in zip(names, combo))
        if c <= budget and (best is None or v < best[0] - 1e-12):
            best = (v, c, dict(zip(names, combo)))
    return best


def test_choice_on_a_hand_built_table():
    # three layers, options named by encoding (worked out by hand)
    harm = {"a": {"2-bit": 5.0, "4-bit": 1.0, "8-bit": 0.1},
            "b": {"pq": 0.6, "4-bit": 0.3},
            "c": {"3-bit": 0.5, "8-bit": 0.0}}
    cost = {"a": {"2-bit": 20, "4-bit": 40, "8-bit": 80},
            "b": {"pq": 10, "4-bit": 20},
            "c": {"3-bit": 30, "8-bit": 60}}
    got = choose(harm, cost, 100)
    assert dict(got.options) == {"a": "4-bit", "b": "4-bit", "c": "3-bit"}
    assert got.cost == 90 and got.harm == pytest.approx(1.8) and got.exact
    assert dict(choose(harm, cost, 89).options) == {"a": "4-bit", "b": "pq", "c": "3-bit"}
    assert dict(choose(harm, cost, 200).options) == {"a": "8-bit", "b": "4-bit", "c": "8-bit"}
    assert dict(choose(harm, cost, 60).options) == {"a": "2-bit", "b": "pq", "c": "3-bit"}


@pytest.mark.parametrize("seed", range(8))
def test_choice_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    harm, cost = {}, {}
    for i in range(6):
        k = int(rng.integers(1, 5))
        cost[i] = {f"o{j}": int(rng.integers(1, 400)) for j in range(k)}
        harm[i] = {o: float(rng.exponential(1.0)) for o in cost[i]}  # harm unrelated to cost: many dominated options
    budget = int(least_cost(cost) + rng.integers(0, 600))
    got = choose(harm, cost, budget)
    best_value, _, _ = _brute(harm, cost, budget)
    assert got.cost <= budget and got.exact
    assert got.harm == pytest.approx(best_value, rel=1e-12, abs=1e-12)
    assert got.cost == sum(cost[n][o] for n, o in got.options.items())


def test_a_thinned_frontier_stays_within_the_budget_and_is_bounded():
    rng = np.random.default_rng(3)
    cost = {i: {b: int(rng.integers(1000, 9000)) * b for b in (2, 3, 4, 8)} for i in range(30)}
    harm = {i: {b: float(rng.uniform(0.1, 10)) * 4.0 ** -b for b in (2, 3, 4, 8)} for i in range(30)}
    budget = sum(c[3] for c in cost.values())
    exact = choose(harm, cost, budget)
    coarse = choose(harm, cost, budget, max_points=50)
    assert not coarse.exact and exact.exact
    assert coarse.cost <= budget
    assert coarse.lower_bound <= exact.harm <= coarse.harm <= exact.harm * 1.2


def test_a_budget_below_the_cheapest_options_is_refused():
    with pytest.raises(SettingsError, match="cheapest options cost 30"):
        choose({"a": {"x": 1.0}, "b": {"y": 1.0, "z": 0.0}}, {"a": {"x": 10}, "b": {"y": 20, "z": 40}}, 29)


@pytest.mark.parametrize("text,want", [("1.9MB", 1_900_000), ("800kB", 800_000), ("1.5MiB", 1_572_864),
                                       ("1500000", 1_500_000), (" 2 mb ", 2_000_000), ("1e6", 1_000_000),
                                       (123456, 123456), ("0.5kb", 500)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "MB", "1.9 MBs", "-3MB", "0", "abc", True, "1,9MB"])
def test_parse_size_refuses_what_is_not_a_size(bad):
    with pytest.raises(SettingsError, match="target size"):
        parse_size(bad)


def test_size_target():
    assert SizeTarget(ratio=10).limit(18_660_045) == 1_866_004
    assert SizeTarget(size="1.9MB").limit(18_660_045) == 1_900_000
    assert SizeTarget.of() is None
    assert SizeTarget.of(ratio=4.5).describe() == "4.5x"
    for bad in (dict(ratio=1), dict(ratio=0.5), dict(ratio=float("nan")), dict(ratio="10"), dict(ratio=10, size=5),
                dict()):
        with pytest.raises(SettingsError):
            SizeTarget(**bad)
