"""tools/probe_group_scales.py: one group per channel is the library's per-channel grid (output-error
clip, GPTQ with act-order); smaller groups lower the layer output error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cora_onnx.torch.search.cora import CoraSettings
from cora_onnx.torch.search.cora.grids import _grid

_spec = importlib.util.spec_from_file_location(
    "probe_group_scales", Path(__file__).resolve().parents[1] / "tools" / "probe_group_scales.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _case():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g)
    x = torch.randn(500, 72, generator=g) @ torch.randn(72, 72, generator=g) * 0.3
    return w, (x.T @ x / 500).double()


def _output_error(w, w_hat, h):
    e = (w_hat - w).reshape(w.shape[0], -1).double()
    return float(((e @ h) * e).sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_one_group_is_the_per_channel_grid(bits):
    w, h = _case()
    s = CoraSettings(bits=bits, budget=0.0, mixed_bits=(), group_size=0)
    ref = _grid(w, s.spec(bits), s, h).dequantize().float()
    mine = probe.group_quantize(w, bits, 72, h, sweeps=1, fp16=False)
    assert torch.allclose(mine, ref, atol=1e-6)


def test_groups_lower_the_output_error():
    w, h = _case()
    s = CoraSettings(bits=3, budget=0.0, mixed_bits=(), group_size=0)
    per_channel = _output_error(w, _grid(w, s.spec(3), s, h).dequantize().float(), h)
    g36 = _output_error(w, probe.group_quantize(w, 3, 36, h), h)
    g20 = _output_error(w, probe.group_quantize(w, 3, 20, h), h)  # last group of each channel shorter
    assert g20 < g36 < per_channel
    assert probe.group_scales(w.reshape(16, -1), 3, 20, h).shape == (16, 4)


def test_channel_blocks_at_one_kernel_position():
    w, h = _case()
    s = CoraSettings(bits=3, budget=0.0, mixed_bits=(), group_size=0)
    per_channel = _output_error(w, _grid(w, s.spec(3), s, h).dequantize().float(), h)
    cin = probe.group_quantize(w, 3, 4, h, layout="cin")  # 2 blocks of 4 channels x 9 positions
    assert _output_error(w, cin, h) < per_channel
    assert not torch.allclose(cin, probe.group_quantize(w, 3, 4, h))  # not the flat groups of 4
