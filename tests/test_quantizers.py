import dataclasses

import pytest
import torch

from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.quantizers import CLIP_METHODS, QuantSpec, fake_quantize, quantize_weight


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


def _skewed_weight() -> torch.Tensor:
    """Channels of unequal scale, each with a positive outlier and a short negative tail: whatever
    range a clip method picks, its largest magnitude is positive, so a symmetric grid does not use
    its extra negative level -2^(b-1) (a grid that does is re-scaled when quantized again: its own
    range is 2^(b-1) steps below zero but 2^(b-1) - 1 above)."""
    g = torch.Generator().manual_seed(0)
    ch = torch.logspace(-2, 0, 16)
    w = torch.randn(16, 24, generator=g).clamp(min=-1.0) * ch[:, None]
    w[:, 0] = 4 * ch
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", CLIP_METHODS)
def test_idempotent(clip, symmetric, per_channel, bits):
    """Quantizing a dequantized grid again gives the same grid, for every clip method, symmetric
    and asymmetric, per channel and per tensor."""
    spec = QuantSpec(bits=bits, clip=clip, symmetric=symmetric, per_channel=per_channel)
    qt = quantize_weight(_skewed_weight(), spec)
    deq = qt.dequantize()
    assert int(qt.q.min()) > -(1 << (bits - 1)) or not symmetric  # the input keeps off the extra level (see above)
    # the grid is a fixed point of its own scale and zero point (exact integers)
    s, z = qt.scale.reshape(-1, 1), qt.zero_point.reshape(-1, 1).float()
    assert torch.equal((deq / s + z).round().clamp(spec.qmin, spec.qmax).to(torch.int16), qt.q)
    # quantized again from its own range (min/max of the dequantized grid): the same integers and values
    again = quantize_weight(deq, dataclasses.replace(spec, clip="minmax"))
    assert torch.equal(again.q, qt.q) and torch.equal(again.zero_point, qt.zero_point)
    torch.testing.assert_close(again.dequantize(), deq, rtol=1e-6, atol=0)
    # and with its own clip method: minmax, and mse (whose search finds the grid's own range exact);
    # std is not idempotent by design (mean +- k std of a grid can cut it again)
    if clip != "std":
        same = quantize_weight(deq, spec)
        assert torch.equal(same.q, qt.q)
        torch.testing.assert_close(same.dequantize(), deq, rtol=1e-6, atol=0)
    if clip == "minmax" and symmetric:  # same scale bit for bit (an asymmetric range recomputes it to rounding)
        assert torch.equal(fake_quantize(deq, spec), deq)


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


def test_output_error_is_the_squared_output_difference_over_the_input_rows():
    from cora_onnx.torch.quantizers import output_error

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 2, 2, generator=g)
    w_hat = w + 0.1 * torch.randn(w.shape, generator=g)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)  # input rows, K = 3 * 2 * 2
    direct = float(((x @ (w - w_hat).reshape(6, -1).double().T) ** 2).sum())
    assert output_error(w, w_hat, x.T @ x) == pytest.approx(direct, rel=1e-10)


def _correlated_inputs(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    return x.double().T @ x.double() / 400


@pytest.mark.parametrize("group", [8, 64])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group_scales_grid(group, bits):
    """Group-wise grid: (C, ceil(K / G)) float16 scales, the last group shorter when G does not
    divide K (K = 27 here), every weight on its group's scale; error at most per channel's."""
    from cora_onnx.torch.quantizers import group_columns

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 3, 3, 3, generator=g) * torch.linspace(0.1, 3, 27).reshape(1, 3, 3, 3)
    qt = quantize_weight(w, QuantSpec(bits=bits, group=group, clip="minmax"))
    ng = -(-27 // group)
    assert qt.scale.shape == (16, ng) and qt.zero_point.shape == (16, ng) and not qt.zero_point.any()
    assert torch.equal(qt.scale, qt.scale.half().float())  # stored as float16
    cols = group_columns(qt.scale, 27, group)
    assert torch.equal(qt.dequantize().reshape(16, -1), qt.q.reshape(16, -1).float() * cols)
    assert qt.q.min() >= -(1 << (bits - 1)) and qt.q.max() <= (1 << (bits - 1)) - 1
    # each group's max |w| lands on the grid's end: min/max per group
    amax = torch.nn.functional.pad(w.reshape(16, -1).abs(), (0, ng * group - 27)).reshape(16, ng, group).amax(2)
    assert torch.allclose(qt.scale, (amax / ((1 << (bits - 1)) - 1)).half().float())
    per_channel = quantize_weight(w, QuantSpec(bits=bits, clip="minmax"))
    assert (qt.dequantize() - w).pow(2).sum() <= (per_channel.dequantize() - w).pow(2).sum() * 1.001


def test_group_output_error_clip_and_gptq():
    """The output-error clip per group never does worse than each group's full range, and GPTQ on
    the fixed groups (act-order) lowers the output error of nearest rounding on that grid."""
    from cora_onnx.torch.quantizers import gptq_round, input_weighted_clip, output_error

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 8, 3, 3, generator=g)
    h = _correlated_inputs(72)
    spec = QuantSpec(bits=3, group=16)
    full = quantize_weight(w, QuantSpec(bits=3, group=16, clip="minmax"))
    clipped = input_weighted_clip(w, spec, h)
    assert clipped.scale.shape == (32, 5) and torch.equal(clipped.scale, clipped.scale.half().float())
    assert output_error(w, clipped.dequantize(), h) <= output_error(w, full.dequantize(), h)
    rounded = gptq_round(w, clipped, h, act_order=True)
    assert torch.equal(rounded.scale, clipped.scale)  # the same grid, other integers
    assert output_error(w, rounded.dequantize(), h) < output_error(w, clipped.dequantize(), h)


def test_gptq_per_channel_unchanged_by_group_support():
    """Per channel, gptq_round takes one scale per row as before (the columns view of the scale)."""
    from cora_onnx.torch.quantizers import gptq_round

    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 20, generator=g)
    h = _correlated_inputs(20, 2)
    qt = quantize_weight(w, QuantSpec(bits=3))
    out = gptq_round(w, qt, h)
    one = torch.stack([gptq_round(w[i:i + 1], quantize_weight(w[i:i + 1], QuantSpec(bits=3)), h).q[0]
                       for i in range(8)])
    assert torch.equal(out.q, one)


@pytest.mark.parametrize("bad", [dict(group=1), dict(group=-4), dict(group=True), dict(group=8, per_channel=False),
                                 dict(group=8, symmetric=False)])
def test_bad_group_rejected(bad):
    with pytest.raises(SettingsError, match="group"):
        QuantSpec(**bad)


@pytest.mark.parametrize("group", [0, 16])
def test_several_widths_in_one_pass_are_each_width_alone(group):
    """gptq_round_many and group_clips stack the widths' rows: each width's grid is the one it gets alone."""
    from cora_onnx.torch.quantizers import gptq_round, gptq_round_many, group_clips, input_weighted_clip

    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 4, 3, 3, generator=g)
    h = _correlated_inputs(36, 4)
    specs = [QuantSpec(bits=b, group=group) for b in (2, 3, 4)]
    alone = [input_weighted_clip(w, sp, h) for sp in specs]
    if group:
        together = group_clips(w, specs, h)
        for a, t in zip(alone, together):
            assert torch.equal(a.scale, t.scale) and torch.equal(a.q, t.q)
    for a, t in zip([gptq_round(w, qt, h, act_order=True) for qt in alone],
                    gptq_round_many(w, alone, h, act_order=True)):
        assert torch.equal(a.q, t.q) and t.spec == a.spec


def test_default_clip_is_minmax_at_8_bits_and_mse_below():
    """Without --clip, 7-8-bit grids keep every weight in range (an outlier is not clipped) and
    narrower grids search the MSE range (the outlier is clipped)."""
    import numpy as np

    from cora_onnx.core.npgrid import default_clip, quantize_symmetric
    from cora_onnx.torch.search.rtn import RtnSettings

    assert [default_clip(b) for b in (2, 3, 4, 6, 7, 8)] == ["mse"] * 4 + ["minmax"] * 2
    assert RtnSettings().spec(8).clip == "minmax" and RtnSettings().spec(4).clip == "mse"
    assert RtnSettings(clip="mse").spec(8).clip == "mse"
    w = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    w[:, 0] = 8.0  # one large weight per channel
    for bits, clipped in ((8, False), (4, True)):
        q, scale = quantize_symmetric(w, bits)
        top = np.abs(q[:, 0].astype(np.float32) * scale - 8.0).max()
        assert (top > 0.5) == clipped, (bits, top)
        qt = quantize_weight(torch.from_numpy(w), RtnSettings().spec(bits))
        assert torch.equal(qt.q.to(torch.int8), torch.from_numpy(q)), bits
