"""Size-targeted search: every Conv/Linear layer's encoding (uniform grids of 2-8 bits per channel
or per group, product-quantization codebooks, low-rank adapters) chosen under one byte budget by
measured harm, exactly, then fitted layer after layer (see search.py)."""

from __future__ import annotations

from cora_onnx.torch.search.auto.menu import layer_facts, layer_menu
from cora_onnx.torch.search.auto.search import (Measured, finetune_choice, fit_choice, harm_table, measure_menu,
                                                menus_of, plan_layers, search_auto)
from cora_onnx.torch.search.auto.settings import AUTO_OPTIONS, FAMILIES, HARMS, METHOD_FAMILIES, AutoSettings


def auto_report(plan) -> dict:
    """The report's `auto` section."""
    return {"auto": dict(plan.meta.get("auto", {}))}


__all__ = ["AutoSettings", "AUTO_OPTIONS", "FAMILIES", "HARMS", "METHOD_FAMILIES", "search_auto", "menus_of",
           "layer_menu", "layer_facts", "auto_report", "Measured", "measure_menu", "harm_table", "fit_choice",
           "finetune_choice", "plan_layers"]
