"""A small ConvNet for 8x8 handwritten digits (scikit-learn's ``load_digits``).

The network takes the grey digit replicated into 3 channels (``N x 3 x 8 x 8``)
and predicts one of 10 classes. It is built only from plain ``nn.Conv2d`` /
``nn.BatchNorm2d`` / ``nn.ReLU`` modules so that
``torch.fx.experimental.optimization.fuse`` fuses every BatchNorm, and it
contains one depthwise convolution so depthwise handling is exercised.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "digits_cnn"]


def _conv_bn_relu(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> list[nn.Module]:
    """Return ``[Conv2d (no bias), BatchNorm2d, ReLU]`` for one block."""
    return [
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """Four conv/BN/ReLU blocks, global average pooling and a linear classifier.

    Shapes for a ``3 x 8 x 8`` input: 16x8x8 -> 32x4x4 -> 32x4x4 (depthwise)
    -> 64x4x4 -> 64 -> ``num_classes``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 16, 3, padding=1),
            *_conv_bn_relu(16, 32, 3, stride=2, padding=1),
            *_conv_bn_relu(32, 32, 3, padding=1, groups=32),
            *_conv_bn_relu(32, 64, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``N x 3 x 8 x 8`` normalised images to ``N x num_classes`` logits."""
        return self.fc(self.flatten(self.pool(self.features(x))))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """Build an untrained :class:`DigitsCNN`."""
    return DigitsCNN(num_classes=num_classes)
