import pytest
import torch

from cora_onnx.errors import SettingsError
from cora_onnx.quantizers import QuantSpec, fake_quantize, quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_minmax_error_within_half_step(bits, symmetric, per_channel):
    w = torch.randn(16, 8, 3, 3)
    qt = quantize_weight(w, QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, clip="minmax"))
    step = qt.scale.reshape(-1, 1, 1, 1)
    err = (qt.dequantize() - w).abs()
    assert torch.all(err <= step / 2 + 1e-6)
    assert int(qt.q.min()) >= qt.spec.qmin and int(qt.q.max()) <= qt.spec.qmax


@pytest.mark.parametrize("clip", ["minmax", "std", "mse"])
def test_idempotent(clip):
    w = torch.randn(32, 16)
    once = fake_quantize(w, QuantSpec(bits=4, clip=clip))
    twice = fake_quantize(once, QuantSpec(bits=4, clip="minmax"))
    if clip == "minmax":
        assert torch.equal(once, twice)
    # the grid is a fixed point of its own quantizer
    qt = quantize_weight(w, QuantSpec(bits=4, clip=clip))
    again = (qt.dequantize() / qt.scale[:, None]).round() * qt.scale[:, None]
    assert torch.allclose(again, qt.dequantize(), atol=1e-6)


def test_per_channel_beats_per_tensor_on_unequal_channels():
    w = torch.randn(8, 64) * torch.logspace(-2, 0, 8)[:, None]
    pc = (fake_quantize(w, QuantSpec(bits=4, per_channel=True, clip="minmax")) - w).pow(2).mean()
    pt = (fake_quantize(w, QuantSpec(bits=4, per_channel=False, clip="minmax")) - w).pow(2).mean()
    assert pc < pt / 2


def test_mse_clip_not_worse_than_minmax():
    w = torch.randn(16, 200)
    w[:, 0] = 8.0  # an outlier per channel
    e = {c: (fake_quantize(w, QuantSpec(bits=3, clip=c)) - w).pow(2).sum() for c in ("minmax", "mse")}
    assert e["mse"] < e["minmax"]


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(clip="max"), dict(k=0)])
def test_bad_settings_rejected(bad):
    with pytest.raises(SettingsError):
        QuantSpec(**bad)


def test_nan_weight_rejected():
    w = torch.randn(4, 4)
    w[0, 0] = float("nan")
    with pytest.raises(SettingsError, match="NaN"):
        quantize_weight(w, QuantSpec())
