"""The search/pq package: its public names, the streamed input statistics, the options added
for the many-class protocol (issue 15)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cora_onnx.data import ImageSet, Preprocess
from cora_onnx.errors import SettingsError
from cora_onnx.export import fuse_batchnorm
from cora_onnx.search import LayerSelection, PqSettings, search_pq
from cora_onnx.torch_images import as_torch


def _images(n=24, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(), None,
                    tuple(map(str, range(n))), Preprocess(input_size=size))


def test_public_names_stay_importable_from_the_package():
    import cora_onnx.search.pq as pq

    for name in ("PqSettings", "PqFit", "search_pq", "fit_codebook", "weighted_error", "block_kind",
                 "parse_block_size", "pq_report", "PQ_OPTIONS", "BLOCK_PRESETS", "assign_with_feedback",
                 "full_error", "float_target", "TARGETS", "SecondMoment", "input_stats", "Geom"):
        assert name in pq.__all__ and getattr(pq, name) is not None, name
    from cora_onnx.search import METHODS

    assert METHODS["pq"].run is pq.search_pq and METHODS["pq"].options is pq.PQ_OPTIONS


def _direct(conv, imgs):
    """(G, K, n) patch columns of all images at once, the reference for the streamed sums."""
    x = torch.cat(list(imgs.batches(len(imgs))))
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (N, C*k*k, L)
    N, FF, L = cols.shape
    G = conv.groups
    return cols.reshape(N, G, FF // G, L).permute(1, 2, 0, 3).reshape(G, FF // G, -1).double()


@pytest.mark.parametrize("groups,stride", [(1, 1), (3, 2)])
def test_streamed_second_moment_equals_the_direct_computation(groups, stride):
    from cora_onnx.search.pq.statistics import module_moment

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, stride=stride, groups=groups).eval()
    imgs = as_torch(_images(n=11))
    cols = _direct(conv, imgs)
    n = cols.shape[2]
    ref = cols @ cols.transpose(1, 2) / n
    mu = cols.mean(2)
    for batch in (1, 4, 11):  # any batching gives the same sums
        acc = module_moment(conv, conv, groups, imgs, batch)
        assert acc.count == n
        torch.testing.assert_close(acc.moment(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc.means()[0], mu, rtol=1e-5, atol=1e-6)
        cov = ref - mu[:, :, None] * mu[:, None, :]
        torch.testing.assert_close(acc.moment(centered=True), cov, rtol=1e-4, atol=1e-6)


def test_cross_moment_and_its_shape_checks():
    from cora_onnx.search.pq.statistics import SecondMoment

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 300, generator=g), torch.randn(2, 5, 300, generator=g) + 1.0
    acc = SecondMoment(5, groups=2)
    acc.add(a[:, :, :100], b[:, :, :100])
    acc.add(a[:, :, 100:], b[:, :, 100:])
    ad, bd = a.double(), b.double()
    torch.testing.assert_close(acc.moment(), ad @ bd.transpose(1, 2) / 300)
    mb = bd.mean(2)
    torch.testing.assert_close(acc.moment(centered=True),
                               (ad - ad.mean(2, keepdim=True)) @ (bd - mb[:, :, None]).transpose(1, 2) / 300)
    with pytest.raises(ValueError, match="do not fit"):
        acc.add(torch.randn(2, 4, 10))
    with pytest.raises(ValueError, match="do not fit"):
        acc.add(torch.randn(2, 5, 10), torch.randn(2, 5, 11))


def test_joint_statistics_of_a_network_with_itself(tiny):
    from cora_onnx.search.pq.statistics import Geom, joint_stats

    fused = fuse_batchnorm(tiny)
    imgs = as_torch(_images())
    S = joint_stats(fused, fused.pw, fused, fused.pw, Geom("pw", "1x1", 4, 1, 2), imgs, 5, centered=True)
    torch.testing.assert_close(S["qq"], S["qf"])
    torch.testing.assert_close(S["ff"], S["qf"])
    torch.testing.assert_close(S["mu_q"], S["mu_f"])


def test_statistics_images_grow_with_a_layers_inputs_per_patch(tiny):
    from cora_onnx.search.pq.search import stats_sizes
    from cora_onnx.quantizers import quantizable_layers

    fused = fuse_batchnorm(tiny)
    layers = quantizable_layers(fused)
    imgs = as_torch(_images(n=40))
    assert stats_sizes(fused, layers, imgs, PqSettings(stats_size=4)) == {n: 4 for n in layers}
    # 8x8 maps: 64 patches per image for the convs, one row per image for the classifier (16 inputs)
    sizes = stats_sizes(fused, layers, imgs, PqSettings(stats_size=4, stats_patches=2))
    assert sizes == {"conv1": 4, "dw": 4, "pw": 4, "fc": 32}
    assert stats_sizes(fused, layers, imgs, PqSettings(stats_size=4, stats_patches=8))["fc"] == 40  # all there are


@pytest.mark.parametrize("kw,match", [
    (dict(distill="l1"), "distill must be one of kl, mse"),
    (dict(augment="rotate"), "augment must be one of"),
    (dict(uniform_layers=[3]), "uniform_layers must be layer-name patterns"),
    (dict(stats_patches=-1), "stats_patches must be an integer >= 0"),
    (dict(stats_patches=True), "stats_patches must be an integer"),
    (dict(finetune_steps=-2), "finetune_steps must be an integer >= 0"),
])
def test_new_settings_are_validated(kw, match):
    with pytest.raises(SettingsError, match=match):
        PqSettings(**kw)


def test_uniform_layers_stay_on_the_grid_and_unknown_patterns_are_refused(tiny):
    fused = fuse_batchnorm(tiny)
    base = dict(em_iters=2, finetune_steps=0, selection=LayerSelection(keep=(), keep_bits=8))
    plan = search_pq(fused, PqSettings(uniform_layers="d?,f*", **base), _images())
    assert {lp.name for lp in plan.layers if lp.uniform is not None} == {"dw", "fc"}
    assert {lp.name for lp in plan.layers if lp.codebook is not None} == {"conv1", "pw"}
    assert plan.layer("fc").uniform.bits == 8
    with pytest.raises(SettingsError, match="'head' names no quantized layer"):
        search_pq(fused, PqSettings(uniform_layers="head", **base), _images())


def test_codewords_only_finetuning_with_mse_and_crops_is_deterministic(tiny):
    fused = fuse_batchnorm(tiny)
    imgs = _images()
    base = dict(em_iters=2, calib_size=24, finetune_lr=1e-2, selection=LayerSelection(keep=()))
    ref = search_pq(fused, PqSettings(finetune_steps=0, **base), imgs)
    kw = dict(finetune_steps=3, finetune_biases=False, finetune_scales=False, distill="mse", augment="crop", **base)
    a, b = search_pq(fused, PqSettings(**kw), imgs), search_pq(fused, PqSettings(**kw), imgs)
    assert a.meta["pq_finetune"]["loss"] == "mse" and a.meta["pq_finetune"]["augment"] == "crop"
    for name in ("conv1", "dw", "pw"):
        r, p, q = (pl.layer(name).codebook for pl in (ref, a, b))
        np.testing.assert_array_equal(p.codewords, q.codewords)
        assert not np.array_equal(r.codewords, p.codewords)  # the codewords moved
        np.testing.assert_array_equal(r.bias, p.bias)  # biases and channel scales did not
        # scales are stored renormalized with the codewords (max |scale| = 1): their ratios are kept
        np.testing.assert_allclose(p.scale.astype(np.float32) / p.scale.astype(np.float32).max(),
                                   r.scale.astype(np.float32) / r.scale.astype(np.float32).max(), rtol=2e-3)
