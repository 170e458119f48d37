"""The torch side's view of an image set: cora_onnx.onnx.data holds numpy arrays (so the ONNX side
reads images without torch); the searches and the PyTorch half of verification read the same
arrays as tensors, zero-copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from cora_onnx.onnx.data import ImageSet, Preprocess

__all__ = ["TorchImages", "TorchPreprocess", "as_torch"]


@dataclass(frozen=True)
class TorchPreprocess:
    """Preprocess.normalize on tensors (the same float32 arithmetic)."""

    preprocess: Preprocess

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> normalized float32."""
        mean = torch.tensor(self.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (images.to(torch.float32) - mean) / std


@dataclass(frozen=True, eq=False)
class TorchImages:
    """An ImageSet seen as tensors: images (uint8 N x 3 x S x S), labels (int64 or None) share
    the set's memory; subset() picks the same images as ImageSet.subset; batches() yields
    normalized float32 tensors."""

    source: ImageSet

    @property
    def images(self) -> torch.Tensor:
        return torch.from_numpy(self.source.images)

    @property
    def labels(self) -> torch.Tensor | None:
        return None if self.source.labels is None else torch.from_numpy(self.source.labels)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.source.paths

    @property
    def preprocess(self) -> TorchPreprocess:
        return TorchPreprocess(self.source.preprocess)

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, n: int | None, seed: int = 0) -> "TorchImages":
        return TorchImages(self.source.subset(n, seed))

    def subset_indices(self, n: int | None, seed: int = 0):
        return self.source.subset_indices(n, seed)

    def take(self, indices) -> torch.Tensor:
        """The normalized float32 batch of the images at `indices`."""
        return torch.from_numpy(self.source.preprocess.normalize(self.source.images[indices]))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for x in self.source.batches(batch_size):
            yield torch.from_numpy(x)


def as_torch(images: ImageSet | TorchImages | None) -> TorchImages | None:
    """The tensor view of an image set (itself when it is one already; None stays None)."""
    if images is None or isinstance(images, TorchImages):
        return images
    return TorchImages(images)
