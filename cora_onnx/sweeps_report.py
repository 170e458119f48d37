"""Moved to cora_onnx.sweeps.report; this name stays importable."""

from __future__ import annotations

from .sweeps.report import format_sweep_table, pareto_front, write_html, write_outputs, write_png

__all__ = ["pareto_front", "format_sweep_table", "write_png", "write_html", "write_outputs"]
