"""Searches that turn a BN-folded torch model (and calibration images) into a Plan.

Every method registers a `Method` in METHODS: a frozen settings dataclass (validated at
construction) and a `run(model, settings, calib)` returning a Plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .layers import LayerSelection, select_layers, uniform_from
from .rtn import RtnSettings, search_rtn

__all__ = ["Method", "METHODS", "LayerSelection", "select_layers", "uniform_from", "RtnSettings", "search_rtn"]


@dataclass(frozen=True)
class Method:
    name: str
    settings: type
    run: Callable[..., Any]
    needs_calib: bool


METHODS: dict[str, Method] = {
    "rtn": Method("rtn", RtnSettings, search_rtn, needs_calib=False),
}
