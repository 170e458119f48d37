"""ONNX graph rewriting passes on onnx_ir. Pure ONNX: nothing here imports torch."""

from .activation_qdq import ActivationQDQPass, QuantScheme, activation_layout, activation_qparams
from .weight_qdq import WeightQDQPass

__all__ = ["ActivationQDQPass", "QuantScheme", "WeightQDQPass", "activation_layout", "activation_qparams"]
