"""The PyTorch half of verification: logits of a torch model on an image set (the ONNX Runtime
half, with the comparisons, is cora_onnx.onnx.verify and needs no torch)."""

from __future__ import annotations

import numpy as np
import torch

from cora_onnx.onnx.data import ImageSet
from cora_onnx.core.progress import progress
from cora_onnx.torch.images import TorchImages, as_torch

__all__ = ["predict_torch"]


def predict_torch(model, images: ImageSet | TorchImages, batch_size: int = 32, desc: str = "pytorch") -> np.ndarray:
    """The model's output on every image (eval mode, inference), as float32 numpy."""
    n = (len(images) + batch_size - 1) // batch_size
    model.eval()
    with torch.inference_mode():
        outs = [model(x).float().numpy() for x in progress(as_torch(images).batches(batch_size), n, desc, "batches")]
    return np.concatenate(outs)
