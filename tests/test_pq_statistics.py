"""The search/pq package: its public names, the streamed input statistics, the options added
for the many-class protocol (issue 15)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.export import apply_plan_torch, fuse_batchnorm
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq
from cora_onnx.torch.images import as_torch
from test_pq import _TwoLayers  # conv 3x3 -> ReLU -> conv 1x1


def _images(n=24, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(), None,
                    tuple(map(str, range(n))), Preprocess(input_size=size))


def test_public_names_stay_importable_from_the_package():
    import cora_onnx.torch.search.pq as pq

    for name in ("PqSettings", "PqFit", "search_pq", "fit_codebook", "weighted_error", "block_kind",
                 "parse_block_size", "pq_report", "PQ_OPTIONS", "BLOCK_PRESETS", "assign_with_feedback",
                 "full_error", "float_target", "TARGETS", "SecondMoment", "input_stats", "Geom"):
        assert name in pq.__all__ and getattr(pq, name) is not None, name
    from cora_onnx.torch.search import METHODS

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
    from cora_onnx.torch.search.pq.statistics import module_moment

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
    from cora_onnx.torch.search.pq.statistics import SecondMoment

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
    from cora_onnx.torch.search.pq.statistics import Geom, joint_stats

    fused = fuse_batchnorm(tiny)
    imgs = as_torch(_images())
    S = joint_stats(fused, fused.pw, fused, fused.pw, Geom("pw", "1x1", 4, 1, 2), imgs, 5, centered=True)
    torch.testing.assert_close(S["qq"], S["qf"])
    torch.testing.assert_close(S["ff"], S["qf"])
    torch.testing.assert_close(S["mu_q"], S["mu_f"])


def test_statistics_images_grow_with_a_layers_inputs_per_patch(tiny):
    from cora_onnx.torch.search.pq.search import stats_sizes
    from cora_onnx.torch.quantizers import quantizable_layers

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
    (dict(weight_target_layers=[3]), "weight_target_layers must be layer-name patterns"),
    (dict(weight_target_layers=("fc", "")), "weight_target_layers must be layer-name patterns"),
    (dict(uniform_layers="pw:9"), "uniform_layers entry 'pw:9': expected PATTERN or PATTERN:BITS with BITS from 2"),
    (dict(uniform_layers="pw:four"), "uniform_layers entry 'pw:four'"),
    (dict(uniform_layers=":4"), "uniform_layers entry ':4'"),
    (dict(uniform_rounding="floor"), "uniform_rounding must be one of nearest, gptq"),
    (dict(uniform_clip="mse"), "uniform_clip must be one of weight, input"),
    (dict(uniform_act_order=1), "uniform_act_order must be True or False"),
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


def test_weight_target_layers_are_fitted_to_their_own_weight(tiny):
    """target "float" everywhere but the layers weight_target_layers names: only the float-target
    layers get the joint statistics (their float_output_error); the pattern is fnmatch-style and one
    naming no product-quantized layer is refused before any work."""
    fused = fuse_batchnorm(tiny)
    base = dict(em_iters=2, finetune_steps=0, calib_size=24, stats_size=12, selection=LayerSelection(keep=()))
    st = PqSettings(weight_target_layers="f?,d*", **base)
    assert st.weight_target_layers == ("f?", "d*")
    assert [st.target_for(n) for n in ("conv1", "dw", "pw", "fc")] == ["float", "weight", "float", "weight"]
    plan = search_pq(fused, st, _images())
    has = {lp.name: "float_output_error" in lp.info for lp in plan.layers}
    assert has == {"conv1": True, "dw": False, "pw": True, "fc": False}
    # fc fitted to its weight is exactly fc of a target="weight" search (the layers before it differ
    # only where they are fitted to the float output, and fc sees them: compare with dw, pw too)
    ref = search_pq(fused, PqSettings(target="weight", **base), _images())
    alone = search_pq(fused, PqSettings(weight_target_layers="*", **base), _images())
    for name in ("conv1", "dw", "pw", "fc"):
        np.testing.assert_array_equal(ref.layer(name).codebook.codes, alone.layer(name).codebook.codes)
    with pytest.raises(SettingsError, match="weight_target_layers entry 'head' names no product-quantized layer"):
        search_pq(fused, PqSettings(weight_target_layers="head", **base), _images())
    with pytest.raises(SettingsError, match="weight_target_layers entry 'fc' names no product-quantized layer"):
        search_pq(fused, PqSettings(weight_target_layers="fc", uniform_layers="fc", **base), _images())


def test_uniform_layers_take_bits_per_pattern_later_entries_win(tiny):
    fused = fuse_batchnorm(tiny)
    base = dict(em_iters=2, finetune_steps=0, selection=LayerSelection(keep=(), keep_bits=8))
    st = PqSettings(uniform_layers="*:4,fc, dw:3", **base)
    assert st.uniform_patterns() == (("*", 4), ("fc", None), ("dw", 3))
    plan = search_pq(fused, st, _images())
    assert {lp.name: lp.uniform.bits for lp in plan.layers} == {"conv1": 4, "dw": 3, "pw": 4, "fc": 8}
    assert all(lp.codebook is None for lp in plan.layers)


@pytest.mark.parametrize("target", ["weight", "float"])
def test_gptq_rounding_of_uniform_layers_lowers_the_output_error(target):
    """conv1 on a 2-bit grid (nearest), conv2 on a 3-bit grid: GPTQ rounding on the quantized
    network's inputs, with the bias correction, gives an output closer to the float network's than
    rounding to nearest; the plan carries the corrected bias and the grid."""
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    imgs = _images(n=48)
    base = dict(finetune_steps=0, calib_size=48, stats_size=48, target=target, uniform_layers="conv2:3",
                selection=LayerSelection(keep=("first",), keep_bits=2))
    x = torch.cat(list(as_torch(imgs).batches(48)))
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for rounding in ("nearest", "gptq"):
        plan = search_pq(model, PqSettings(uniform_rounding=rounding, **base), imgs)
        assert plan.layer("conv1").uniform.bits == 2 and plan.layer("conv2").uniform.bits == 3
        assert (plan.layer("conv2").bias is not None) == (rounding == "gptq")
        assert (plan.layer("conv1").bias is None) and plan.layer("conv2").codebook is None
        with torch.no_grad():
            out = apply_plan_torch(model, plan)(x)
        errors[rounding] = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    # target "weight" cannot undo conv1's 2-bit error, which dominates: 0.084 vs 0.095 when written;
    # "float" can: 0.071
    assert errors["gptq"] < {"weight": 0.93, "float": 0.8}[target] * errors["nearest"], errors


def test_uniform_clip_and_act_order_reach_the_gptq_grid():
    """uniform_clip "input": conv2's per-channel range is the one input_weighted_clip picks under the
    layer's input statistics (not the weight-MSE clip); uniform_act_order changes the rounding order
    only (same grid, other integers); both are recorded in the plan, and the result still beats
    rounding to nearest on the network's output."""
    from cora_onnx.torch.quantizers import QuantSpec, input_weighted_clip
    from cora_onnx.torch.search.pq.statistics import Geom, input_stats

    torch.manual_seed(0)
    model = _TwoLayers().eval()
    imgs = _images(n=48)
    base = dict(finetune_steps=0, calib_size=48, stats_size=48, target="weight", uniform_layers="conv2:3",
                selection=LayerSelection(keep=("first",), keep_bits=8))
    x = torch.cat(list(as_torch(imgs).batches(48)))
    with torch.no_grad():
        ref = model(x)

    def run(**kw):
        plan = search_pq(model, PqSettings(**base, **kw), imgs)
        with torch.no_grad():
            err = float((apply_plan_torch(model, plan)(x) - ref).pow(2).sum() / ref.pow(2).sum())
        return plan, err

    near, e_near = run()
    weight = run(uniform_rounding="gptq")[0].layer("conv2")
    inp = run(uniform_rounding="gptq", uniform_clip="input")[0].layer("conv2")
    both, e_both = run(uniform_rounding="gptq", uniform_clip="input", uniform_act_order=True)
    both = both.layer("conv2")
    assert (inp.info["clip"], inp.info["act_order"], both.info["act_order"]) == ("input", False, True)
    assert not np.allclose(weight.uniform.scale, inp.uniform.scale)
    np.testing.assert_array_equal(inp.uniform.scale, both.uniform.scale)
    assert not np.array_equal(inp.uniform.q, both.uniform.q)
    # the input clip's range, recomputed on the statistics conv2 sees (conv1 on its 8-bit grid)
    student = apply_plan_torch(model, near)
    w = model.conv2.weight.detach().float()
    H, _ = input_stats(student, student.conv2, Geom("conv2", "1x1", w[0].numel(), 1, 1), as_torch(imgs).subset(48, 0),
                       32, full=True, centered=True)
    qt = input_weighted_clip(w, QuantSpec(bits=3), H.reshape(w[0].numel(), -1))
    np.testing.assert_allclose(inp.uniform.scale, qt.scale.numpy(), rtol=1e-5)
    assert e_both < e_near, (e_both, e_near)


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
