"""Streamed input statistics (cora_onnx.torch.search.stats) and the GPTQ grid built on them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.quantizers import QuantSpec, gptq_round, input_weighted_clip, quantize_weight
from cora_onnx.torch.search.cora import CoraSettings
from cora_onnx.torch.search.stats import SecondMoment, input_rows, input_second_moments, patches_at, unfold


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7)).eval()


def test_streamed_second_moment_equals_the_direct_one():
    """All positions, batch by batch: the same X^T X / rows as one product of every unfolded patch."""
    net, x = _net(), torch.randn(10, 3, 8, 8)
    acc = input_second_moments(net, {"1": net[2], "2": net[5]}, [x[:3], x[3:7], x[7:]])
    h = net[1](net[0](x))
    cols = F.unfold(h, 3, padding=1).transpose(1, 2).reshape(-1, 6 * 9).double()
    direct = cols.T @ cols / cols.shape[0]
    assert acc["1"].count == 10 * 16
    torch.testing.assert_close(acc["1"].value(), direct, rtol=1e-5, atol=1e-6)
    flat = net[4](net[3](net[2](h))).double()
    torch.testing.assert_close(acc["2"].value(), flat.T @ flat / 10, rtol=1e-5, atol=1e-6)
    # the conv weight times the rows is the conv output (same unfold order as the weight)
    w = net[2].weight.reshape(5, -1)
    out = (input_rows(net[2], h) @ w.T).reshape(10, 16, 5).transpose(1, 2).reshape(10, 5, 4, 4)
    torch.testing.assert_close(out + net[2].bias[None, :, None, None], net[2](h), rtol=1e-4, atol=1e-5)


def test_row_subsampling_and_early_stop():
    net, x = _net(), torch.randn(8, 3, 8, 8)
    calls = []
    net[5].register_forward_hook(lambda *a: calls.append(1))
    acc = input_second_moments(net, {"0": net[0]}, [x[:4], x[4:]], rows={"0": 16})
    assert acc["0"].count == 8 * 2  # ceil(16 / 8) positions per image
    assert not calls  # the forward stopped at the only layer asked for
    m = SecondMoment(3)
    assert torch.equal(m.value(), torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(3, 5), dilation=2, padding=(2, 4)), dict(kernel_size=1),
                                dict(kernel_size=3, padding="same"), dict(kernel_size=2, stride=2)])
def test_patches_at_some_positions_are_those_of_the_full_unfold(kw):
    conv = nn.Conv2d(3, 4, **kw)
    x = torch.randn(2, 3, 11, 9)
    full = unfold(conv, x)
    pos = torch.randperm(full.shape[2])[:7]
    assert torch.equal(patches_at(conv, x, pos), full[:, :, pos])
    # input_rows draws the same positions as before (one randperm of every position), gathered directly
    rows = input_rows(conv, x, keep=5, gen=torch.Generator().manual_seed(3))
    keep = torch.randperm(full.shape[2], generator=torch.Generator().manual_seed(3))[:5]
    assert torch.equal(rows, full[:, :, keep].transpose(1, 2).reshape(-1, full.shape[1]))


def test_wide_second_moment_from_blocks_and_held_back_rows():
    """K >= 1024: the gram is multiplied by blocks above the diagonal, rows held back until flushed."""
    m = SecondMoment(1100, chunk=300)
    x = torch.randn(700, 1100)
    for i in range(0, 700, 100):
        m.add_rows(x[i:i + 100])
    assert m.count == 700
    torch.testing.assert_close(m.value(), x.double().T @ x.double() / 700, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.means()[0][0], x.double().mean(0), rtol=1e-5, atol=1e-6)


def _output_error(w, w_hat, h):
    e = (w - w_hat).reshape(w.shape[0], -1).double()
    return float(((e @ h.double()) * e).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_full_statistics_beats_nearest_rounding(act_order):
    """On correlated inputs, GPTQ's output error (w - w_hat) H (w - w_hat)^T is below nearest rounding's."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(32, 1, 12, 12) + 0.3 * torch.randn(32, 4, 12, 12)  # correlated channels
    x = F.avg_pool2d(x, 3, stride=1)  # and neighbouring pixels
    h = input_second_moments(conv, {"c": conv}, [x[:16], x[16:]])["c"].value()
    assert torch.linalg.matrix_rank(h) == 36  # full rank
    spec = QuantSpec(bits=3, per_channel=True, symmetric=True, clip="mse")
    w = conv.weight.detach()
    nearest = quantize_weight(w, spec)
    gptq = gptq_round(w, nearest, h, act_order=act_order)
    assert torch.equal(gptq.scale, nearest.scale) and gptq.q.abs().max() <= 4
    assert _output_error(w, gptq.dequantize(), h) < 0.8 * _output_error(w, nearest.dequantize(), h)
    # the input-weighted range is never worse than the weight-MSE one for the output error (min/max is a candidate)
    clipped = input_weighted_clip(w, spec, h)
    minmax = quantize_weight(w, QuantSpec(bits=3, per_channel=True, symmetric=True, clip="minmax"))
    assert _output_error(w, clipped.dequantize(), h) <= _output_error(w, minmax.dequantize(), h) + 1e-9


def test_input_weighted_clip_needs_per_channel():
    with pytest.raises(SettingsError, match="per channel"):
        input_weighted_clip(torch.randn(2, 3), QuantSpec(per_channel=False), torch.eye(3))


@pytest.mark.parametrize("kw,word", [({"cov_rows": 0}, "cov_rows"), ({"gptq_damp": 0}, "gptq_damp"), ({"gptq_passes": 0}, "gptq_passes"),
                                     ({"gptq_passes": 1.5}, "gptq_passes"), ({"act_order": "yes"}, "act_order"),
                                     ({"clip_metric": "output"}, "clip_metric"),
                                     ({"clip_metric": "input", "per_channel": False}, "per-channel")])
def test_bad_statistics_settings(kw, word):
    with pytest.raises(SettingsError, match=word):
        CoraSettings(**kw)
