"""ONNX graph rewriting passes on onnx_ir. Pure ONNX: nothing here imports torch."""

from .codebook_decode import CodebookDecodePass
from .weight_qdq import WeightQDQPass

__all__ = ["CodebookDecodePass", "WeightQDQPass"]
