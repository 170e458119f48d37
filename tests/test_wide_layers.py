"""Layers wider than quantizers.WIDE_K (VGG's classifier, K = 25,088): the cheaper clip, GPTQ, output
error and statistics they get, and the unchanged grids of every layer up to that width. The wide
routes are tried on small weights with WIDE_K lowered."""

import hashlib

import pytest
import torch
from torch import nn

from cora_onnx.torch import quantizers
from cora_onnx.torch.quantizers import (QuantSpec, group_clips, gptq_round_many, input_weighted_clip, output_error,
                                        quantize_weight)
from cora_onnx.torch.search import stats
from digests import same_machine


def _inputs(k: int, n: int, seed: int) -> torch.Tensor:
    """H of n correlated input rows, input 5 always zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(n, k, generator=g)
    x[:, 5] = 0
    return x.double().T @ x.double() / n


def _digest() -> str:
    """Clip, GPTQ (both orders) and output error of a 3 x 3 conv's weight (K = 36) at 2-4 bits,
    per channel and in groups of 16."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 4, 3, 3, generator=g) * torch.linspace(0.2, 2, 36).reshape(1, 4, 3, 3)
    h = _inputs(36, 20, 8)
    sha = hashlib.sha256()
    for group in (0, 16):
        specs = [QuantSpec(bits=b, group=group) for b in (2, 3, 4)]
        clipped = group_clips(w, specs, h) if group else [input_weighted_clip(w, sp, h) for sp in specs]
        for act_order in (False, True):
            for qt in clipped + gptq_round_many(w, clipped, h, act_order=act_order):
                sha.update(qt.q.numpy().tobytes())
                sha.update(qt.scale.numpy().tobytes())
        sha.update(repr(output_error(w, clipped[0].dequantize(), h)).encode())
    return sha.hexdigest()[:16]


@pytest.mark.parametrize("wide_k", [quantizers.WIDE_K, 36])
@same_machine
def test_ordinary_widths_keep_the_grids_they_had(monkeypatch, wide_k):
    """Up to WIDE_K (here also at K == WIDE_K) every integer, scale and error is the one the code
    before WIDE_K gave (the digest was taken from it, commit 9ea9304)."""
    monkeypatch.setattr(quantizers, "WIDE_K", wide_k)
    assert _digest() == "3cfbdb8c668dbbe5"


@pytest.mark.parametrize("group", [0, 16])
def test_wide_clip_is_the_clip_on_the_hessian_diagonal(monkeypatch, group):
    """Above WIDE_K the clip weighs the errors by H's diagonal alone: the ranges the full clip
    chooses when H is that diagonal."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 72, generator=g) * torch.linspace(0.2, 2, 72)
    h = _inputs(72, 50, 2)
    specs = [QuantSpec(bits=b, group=group) for b in (2, 3, 4)]

    def clip(hessian):
        return group_clips(w, specs, hessian) if group else [input_weighted_clip(w, sp, hessian) for sp in specs]

    full = clip(torch.diag(torch.diag(h)))
    monkeypatch.setattr(quantizers, "WIDE_K", 32)
    for a, b in zip(clip(h), full):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.q, b.q) and a.spec == b.spec


def test_wide_gptq_is_gptq_within_its_spans(monkeypatch):
    """Above WIDE_K GPTQ takes spans of WIDE_K columns alone: with no cross terms between the spans
    it rounds as the whole-matrix GPTQ does; on a full H it keeps the grid and beats nearest
    rounding."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 72, generator=g)
    h = _inputs(72, 100, 4)
    block_diagonal = torch.block_diag(*[h[i:i + 24, i:i + 24] for i in range(0, 72, 24)])
    specs = [QuantSpec(bits=b, group=8) for b in (2, 4)]
    grids = [quantize_weight(w, sp) for sp in specs]
    whole = gptq_round_many(w, grids, block_diagonal)
    monkeypatch.setattr(quantizers, "WIDE_K", 24)
    spans = gptq_round_many(w, grids, block_diagonal)
    for a, b in zip(spans, whole):
        assert (a.q == b.q).float().mean() > 0.99 and torch.equal(a.scale, b.scale)
    for near, rounded in zip(grids, gptq_round_many(w, grids, h, act_order=True)):
        assert torch.equal(rounded.scale, near.scale)
        assert output_error(w, rounded.dequantize(), h) < output_error(w, near.dequantize(), h)


def test_wide_output_error_and_statistics(monkeypatch):
    """Above WIDE_K output_error multiplies by column blocks (the same error) and the statistics
    pass sums H in float32 (nearly the float64 one); take() is value() without a second K x K."""
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(40, 3000), nn.ReLU(), nn.Linear(3000, 4))
    batches = [torch.randn(8, 40, generator=g) for _ in range(3)]
    direct = stats.input_second_moments(net, {"1": net[2]}, batches)["1"].take()
    assert direct.dtype == torch.float64
    monkeypatch.setattr(stats, "WIDE_K", 2048)
    acc = stats.input_second_moments(net, {"1": net[2]}, batches)["1"]
    value = acc.value()
    wide = acc.take()
    assert wide.dtype == torch.float32 and torch.equal(wide, value) and acc.ab is None
    torch.testing.assert_close(wide.double(), direct, rtol=1e-5, atol=1e-6)
    w = net[2].weight.detach()
    w_hat = quantize_weight(w, QuantSpec(bits=3)).dequantize()
    exact = output_error(w, w_hat, direct)
    monkeypatch.setattr(quantizers, "WIDE_K", 1024)
    assert output_error(w, w_hat, direct) == pytest.approx(exact, rel=1e-12)
