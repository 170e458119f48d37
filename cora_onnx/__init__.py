"""cora-onnx: make ConvNets small for edge deployment and prove it in ONNX Runtime.

The package imports torch lazily, so `passes` (pure ONNX) can import `cora_onnx.core.plan` and
`cora_onnx.core.errors` without pulling torch in.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["quantize", "export_plan", "QuantizeResult", "sweep", "import_pq", "ImportResult", "Plan", "RunOptions",
           "__version__"]


def __getattr__(name: str):
    if name in ("quantize", "export_plan", "QuantizeResult"):
        from cora_onnx.run import api

        return getattr(api, name)
    if name == "sweep":
        from cora_onnx.run.sweeps import sweep

        return sweep
    if name in ("import_pq", "ImportResult"):
        from cora_onnx.run import pq_import

        return getattr(pq_import, name)
    if name == "Plan":
        from cora_onnx.core.plan import Plan

        return Plan
    if name == "RunOptions":
        from cora_onnx.core.options import RunOptions

        return RunOptions
    raise AttributeError(f"module 'cora_onnx' has no attribute {name!r}")
