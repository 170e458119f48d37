"""ONNX graph rewriting passes on onnx_ir. Pure ONNX: nothing here imports torch."""

from .weight_qdq import WeightQDQPass

__all__ = ["WeightQDQPass"]
