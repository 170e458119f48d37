"""Per-layer bit widths under one size budget in bytes (CoRa `mixed_bits`, issue 14).

Every candidate layer is quantized at every allowed width (the uniform search's grid recipe below
8 bits: output-error clip, GPTQ; 8 bits as the kept layers: weight-error range, nearest rounding).
The cost of a choice is its stored bits (2-4 bits packed or INT4, 5-8 bits in INT8 containers:
`storage_bits`; with group-wise scales their float16 values too: `layer_cost`); its harm is the network's mean KL(float || quantized) on a few calibration images
when only that layer is quantized at that width (measured for every width below 8; the 8-bit harm,
next to nothing, is carried from the widest measured width by the layer's output error,
`quantizers.output_error`). The widths with the least summed harm within the bytes of the uniform
plan are found by `choose_bits`, exactly (the Pareto frontier of stored bits and harm, exact costs).
The harm is measured by cora_onnx.torch.search.harm.layer_harm (from cached stage inputs)."""

from __future__ import annotations

import math

from cora_onnx.core.budget import choose, least_cost
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.quantizers import group_count


def storage_bits(bits: int) -> int:
    """Bits one weight of a `bits`-bit grid takes in the file: 2-3-bit grids are packed tightly,
    4-bit ones are INT4, 5-8-bit ones INT8."""
    return bits if bits <= 4 else 8


def check_mixed_bits(choices: tuple[int, ...], bits: int, budget: float | None = None) -> None:
    """Widths from 2 to 8 that can fit the budget: `budget` stored bits per weight, or uniform `bits`."""
    if budget is not None:
        if not choices:
            raise SettingsError("a mixed budget needs mixed bits (--mixed-bits), not none")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1 <= budget <= 8:
            raise SettingsError(f"mixed budget must be from 1 to 8 stored bits per weight, got {budget!r}")
    if not choices:
        return
    if any(not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8 for b in choices):
        raise SettingsError(f"mixed bits must be integers from 2 to 8, got {','.join(map(str, choices))}")
    least = min(storage_bits(b) for b in choices)
    if budget is None and least > storage_bits(bits):
        raise SettingsError(f"mixed bits {','.join(map(str, choices))} cannot fit the bytes of uniform {bits}-bit "
                            f"weights: include a width of {bits} bits or fewer")
    if budget is not None and least > budget:
        raise SettingsError(f"mixed bits {','.join(map(str, choices))} cannot fit a budget of {budget:g} bits per "
                            f"weight: include a width of {int(budget)} bits or fewer")


def parse_mixed_bits(text) -> tuple[int, ...]:
    """'2,3,4,8' -> (2, 3, 4, 8); '' or 'none' -> () (uniform)."""
    if isinstance(text, (tuple, list)):
        return tuple(sorted(set(int(b) for b in text)))
    text = str(text).strip().lower()
    if text in ("", "none", "off", "0"):
        return ()
    try:
        return tuple(sorted(set(int(b) for b in text.split(","))))
    except ValueError:
        raise SettingsError(f"mixed bits must be a comma-separated list of widths such as 2,3,4,8, got {text!r}") \
            from None


def layer_cost(count: int, channels: int, bits: int, group: int) -> int:
    """Stored bits of one layer's grid: its weights at storage_bits, plus float16 group scales
    (group > 0, below 8 bits) of each of its `channels` rows of count / channels weights."""
    if not group or bits >= 8:
        return count * storage_bits(bits)
    return count * storage_bits(bits) + 16 * channels * group_count(count // channels, group)


def choose_bits(harm: dict[str, dict[int, float]], cost: dict[str, dict[int, float]], budget_bits: float,
                max_points: int = 20000) -> dict[str, int]:
    """The widths (one per layer, from the keys of harm[layer]) with the least summed harm whose
    stored bits, sum of cost[l][b_l], stay within budget_bits: `cora_onnx.core.budget.choose`, exact
    (so uniform b0 always fits its own budget); a frontier longer than max_points is searched in
    coarser cost units, rounded up (then near-optimal, never over the budget)."""
    costs = {n: {b: int(math.ceil(c)) for b, c in cost[n].items()} for n in harm}
    if least_cost(costs) > budget_bits:
        raise SettingsError(f"mixed bits: no choice of widths fits the budget ({budget_bits / 8:.0f} bytes)")
    return dict(choose(harm, costs, int(math.floor(budget_bits)), max_points=max_points).options)
