"""ONNX graph rewriting passes on onnx_ir. Pure ONNX: nothing here imports torch."""

from .bias_update import BiasUpdatePass
from .low_rank_branch import LowRankBranchPass
from .weight_qdq import WeightQDQPass

__all__ = ["BiasUpdatePass", "LowRankBranchPass", "WeightQDQPass"]
