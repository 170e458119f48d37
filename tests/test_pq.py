import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cora_onnx.cli.main import main
from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.export import apply_plan_torch, fuse_batchnorm
from cora_onnx.core.plan import Plan
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq
from cora_onnx.torch.search.pq import assign_with_feedback, fit_codebook, full_error, parse_block_size, weighted_error
from cora_onnx.torch.images import as_torch


def _images(n=48, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(), None,
                    tuple(map(str, range(n))), Preprocess(input_size=size))


def _anisotropic_problem(seed=0, O=48, m=16, d=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, m, d, generator=g)
    x = torch.randn(4000, m, d, generator=g) * torch.linspace(0.05, 3.0, d)  # inputs of very different scale
    x[..., 1] += 0.9 * x[..., 0]  # and correlated
    H = torch.einsum("nbi,nbj->bij", x, x)[None] / x.shape[0]
    return w, H


@pytest.mark.parametrize("channel_scale", [False, True])
def test_em_beats_plain_kmeans_on_the_activation_weighted_error(channel_scale):
    w, H = _anisotropic_problem()
    identity = torch.eye(w.shape[2]).expand(1, w.shape[1], w.shape[2], w.shape[2]).contiguous()
    em = fit_codebook(w, H, 32, 20, channel_scale=channel_scale)
    km = fit_codebook(w, identity, 32, 20, channel_scale=channel_scale)  # identity H: plain k-means
    e_em, e_km = weighted_error(w, H, em.weight()), weighted_error(w, H, km.weight())
    assert e_em == pytest.approx(em.error, rel=1e-4)
    assert e_em < 0.85 * e_km
    # and k-means is the better one on the plain weight error it optimizes
    assert weighted_error(w, identity, km.weight()) < weighted_error(w, identity, em.weight())


def test_error_feedback_lowers_the_full_covariance_error():
    g = torch.Generator().manual_seed(2)
    O, m, d = 64, 16, 4
    w = torch.randn(O, m, d, generator=g)
    x = torch.randn(5000, m * d, generator=g) @ (0.3 * torch.randn(m * d, m * d, generator=g) + torch.eye(m * d))
    H = (x.T @ x / x.shape[0])[None]  # inputs correlated across blocks
    blocks = torch.diagonal(H.reshape(1, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
    fit = fit_codebook(w, blocks, 32, 10)
    fb = assign_with_feedback(w, H, fit)
    assert torch.equal(fb.codewords, fit.codewords) and fb.codes.shape == fit.codes.shape
    assert fb.error == pytest.approx(full_error(w, H, fb.weight()))
    assert fb.error < 0.9 * full_error(w, H, fit.weight())


def test_em_is_exact_when_a_layer_has_few_distinct_subvectors():
    g = torch.Generator().manual_seed(1)
    book = torch.randn(200, 9, generator=g).half().float()
    codes = torch.randint(0, 200, (64, 16), generator=g)
    w = book[codes]
    H = torch.eye(9).expand(1, 16, 9, 9).contiguous() * 2.0
    fit = fit_codebook(w, H, 256, 5, channel_scale=False)
    assert fit.codewords.shape[0] <= 200
    assert torch.equal(fit.weight(), w)


def test_blocks_without_calibration_energy_keep_their_weights():
    """Dead input channels (H_b = 0) and nearly dead ones (1e-9 of the energy) must not leave the
    codes arbitrary: damping makes those blocks plain k-means, so an exactly representable layer is
    reproduced exactly although its activation-weighted error is 0 either way."""
    g = torch.Generator().manual_seed(3)
    O, m, d = 32, 12, 9
    book = torch.randn(40, d, generator=g).half().float()
    codes = torch.randint(0, 40, (O, m), generator=g)
    w = book[codes]
    x = torch.randn(3000, m, d, generator=g)
    x[:, :4] = 0.0  # four dead input channels
    x[:, 4:6] *= 3e-5  # two nearly dead ones
    H = torch.einsum("nbi,nbj->bij", x, x)[None] / x.shape[0]
    fit = fit_codebook(w, H, 64, 10, channel_scale=False)
    assert fit.error < 1e-9
    assert float((fit.weight() - w).norm() / w.norm()) < 1e-5
    with pytest.raises(ValueError, match="damping"):
        fit_codebook(w, H, 64, 1, damping=-1.0)


def test_search_codes_fit_one_byte_and_plan_roundtrip(tiny, tmp_path):
    fused = fuse_batchnorm(tiny)
    st = PqSettings(codewords=256, em_iters=5, finetune_steps=3, calib_size=32, selection=LayerSelection(keep=()))
    plan = search_pq(fused, st, _images())
    assert [lp.name for lp in plan.layers] == ["conv1", "dw", "pw", "fc"]
    for lp in plan.layers:
        cb = lp.codebook
        assert cb is not None and cb.codes.dtype == np.uint8 and cb.codewords.dtype == np.float16
        assert cb.codewords.shape[0] <= 256 and int(cb.codes.max()) < cb.codewords.shape[0]
        assert cb.codes.size * cb.block_size == int(np.prod(lp.shape))
    assert {lp.name: lp.codebook.block_size for lp in plan.layers} == {"conv1": 9, "dw": 9, "pw": 4, "fc": 4}
    plan.save(tmp_path / "p")
    back = Plan.load(tmp_path / "p")
    for a, b in zip(plan.layers, back.layers):
        np.testing.assert_array_equal(a.codebook.decode(a.shape), b.codebook.decode(b.shape))
        np.testing.assert_array_equal(a.codebook.bias, b.codebook.bias)


def test_large_blocks_and_explicit_sizes(tiny):
    fused = fuse_batchnorm(tiny)
    imgs = _images()
    plan = search_pq(fused, PqSettings(blocks="large", em_iters=2, finetune_steps=0, selection=LayerSelection(keep=())),
                     imgs)
    # conv1 has 27 weights per filter: the large preset (18) does not divide it, so it falls back to 9
    assert {lp.name: lp.codebook.block_size for lp in plan.layers} == {"conv1": 9, "dw": 9, "pw": 8, "fc": 8}
    plan = search_pq(fused, PqSettings(block_size="1x1=2,linear=16", em_iters=2, finetune_steps=0,
                                        selection=LayerSelection(keep=("first",))), imgs)
    assert plan.layer("conv1").uniform is not None and plan.layer("conv1").codebook is None
    assert plan.layer("pw").codebook.block_size == 2 and plan.layer("fc").codebook.block_size == 16


def test_finetuning_can_leave_biases_and_the_classifier_alone(tiny):
    fused = fuse_batchnorm(tiny)
    imgs = _images()
    base = dict(em_iters=2, calib_size=32, finetune_lr=1e-2, selection=LayerSelection(keep=()))
    ref = search_pq(fused, PqSettings(finetune_steps=0, **base), imgs)
    full = search_pq(fused, PqSettings(finetune_steps=4, **base), imgs)
    part = search_pq(fused, PqSettings(finetune_steps=4, finetune_biases=False, finetune_last=False, **base), imgs)
    for name in ("conv1", "dw", "pw", "fc"):
        r, f, p = (pl.layer(name).codebook for pl in (ref, full, part))
        assert not np.array_equal(r.bias, f.bias) and not np.array_equal(r.codewords, f.codewords)
        np.testing.assert_array_equal(r.bias, p.bias)
        assert np.array_equal(r.codewords, p.codewords) == (name == "fc")
    ft = full.meta["pq_finetune"]  # each step's KL = its loss minus its own batch's teacher entropy
    assert ft["kl_first"] >= -1e-5 and ft["kl_last"] >= -1e-5


@pytest.mark.parametrize("kw,match", [
    ({"codewords": 257}, "codewords must be an integer from 1 to 256"),
    ({"codewords": 0}, "codewords"),
    ({"blocks": "medium"}, "blocks must be one of small, large"),
    ({"block_size": "1x1=0"}, "block_size for 1x1 must be a positive integer"),
    ({"block_size": "=4"}, "block_size entry without a kind or layer name"),
    ({"block_size": "1x1"}, "KIND=SIZE"),
    ({"em_iters": 0}, "em_iters"),
    ({"finetune_lr": -1.0}, "finetune_lr"),
    ({"damping": -0.1}, "damping must be a number >= 0"),
])
def test_bad_settings_are_rejected(kw, match):
    with pytest.raises(SettingsError, match=match):
        PqSettings(**kw)


def test_block_size_not_dividing_a_layer_is_rejected_before_any_work(tiny):
    fused = fuse_batchnorm(tiny)
    with pytest.raises(SettingsError, match=r"block size 3 does not divide layer pw \(1x1, 8 weights"):
        search_pq(fused, PqSettings(block_size="1x1=3"), _images())
    with pytest.raises(SettingsError, match=r"block size 3 does not divide layer pw \(1x1, 8 weights"):
        search_pq(fused, PqSettings(block_size="p?=3"), _images())
    with pytest.raises(SettingsError, match=r"'conv' is neither a kernel kind .* nor the name of a product-quantized"):
        search_pq(fused, PqSettings(block_size="conv=4"), _images())
    assert parse_block_size({"3x3": 18, "linear": 8}) == (("3x3", 18), ("linear", 8))
    assert parse_block_size("fc=2,1X1=8,a.*=4") == (("1x1", 8), ("fc", 2), ("a.*", 4))


def test_layer_name_block_size_overrides_the_kind(tiny):
    """A layer-name entry wins over its kernel kind ("1x1=4" would give pw 4); the other layers
    keep their kind's size."""
    fused = fuse_batchnorm(tiny)
    settings = PqSettings(block_size="1x1=4,linear=4,p?=8", finetune_steps=0, em_iters=2, calib_size=16,
                          stats_size=8, selection=LayerSelection(keep=()))
    plan = search_pq(fused, settings, _images())
    got = {lp.name: lp.codebook.block_size for lp in plan.layers if lp.codebook is not None}
    assert got == {"conv1": 9, "dw": 9, "pw": 8, "fc": 4}


def _cli(digits, out, *extra):
    args = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--method", "pq", "--out", out, "--latency-runs", 2, "-q", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("extra,match", [
    (("--codewords", 300), "error: codewords must be an integer from 1 to 256 (codes are stored in one byte"),
    (("--block-size", "3x3=7"), "error: block size 7 does not divide layer features.3 (3x3, 144 weights"),
    (("--block-size", "conv=4"), "error: block_size entry 'conv' is neither a kernel kind"),
    (("--blocks", "large", "--bits", 4, "--clip", "mse"), "error: --clip does not apply to --method pq"),
    (("--uniform-layers", "head*"), "error: uniform_layers entry 'head*' names no quantized layer"),
    (("--uniform-layers", "features.0:9"), "error: uniform_layers entry 'features.0:9': expected PATTERN or"),
    (("--weight-target-layers", "head"), "error: weight_target_layers entry 'head' names no product-quantized"),
    (("--stats-patches", -3), "error: stats_patches must be an integer >= 0"),
])
def test_cli_rejects_bad_pq_options(digits, tmp_path, extra, match):
    res = _cli(digits, tmp_path / "m.onnx", *extra)
    assert res.exit_code == 2, res.output
    assert match in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_pq_end_to_end(digits, tmp_path):
    res = _cli(digits, tmp_path / "m.onnx", "--keep", "first", "--codewords", 64, "--em-iters", 5,
               "--finetune-steps", 10, "--calib-size", 128, "--block-size", "features.3=16",
               "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["method"] == "pq" and r["settings"]["codewords"] == 64 and r["settings"]["seed"] == 0
    assert r["parity"]["top1_agreement"] >= 99.5 and r["parity"]["max_abs_error"] < 1e-3
    assert r["top1"]["quantized_onnxruntime"] > r["top1"]["float"] - 15
    pq = r["pq"]
    assert pq["layers_pq"] == len(pq["layers"]) >= 2 and pq["layers_uniform"] == 1
    assert all(layer["codewords"] <= 64 and layer["activation_weighted_error"] >= 0 for layer in pq["layers"])
    sizes = {layer["name"]: layer["block_size"] for layer in pq["layers"]}
    assert sizes == {"features.3": 16, "features.6": 9, "features.9": 4, "fc": 4}  # the other 3x3 keeps 9
    assert r["onnx_bytes"] == (tmp_path / "m.onnx").stat().st_size
    table = res.output  # the CLI prints format_table of the report
    assert "-bit weights" not in table and "up to 64 codewords per layer" in table
    assert f"{pq['layers_pq']} layers (codes {pq['stored_bytes']['codes'] / 1e3:.1f} kB" in table


def test_shared_option_help_shows_each_methods_default():
    res = CliRunner().invoke(main, ["quantize", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "--calib-size INTEGER Calibration images used [cora: 1600; pq: 256; auto: 1600] (cora, pq, auto)" in text


def test_input_statistics_are_the_covariance_when_the_bias_absorbs_the_mean():
    from cora_onnx.torch.search.pq import Geom, input_stats

    conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    imgs = as_torch(_images(n=8))
    patches = torch.cat([F.unfold(x, 3, padding=1) for x in imgs.batches(4)])  # (N, 27, L)
    x = patches.permute(0, 2, 1).reshape(-1, 27).double()
    geom = Geom("c", "3x3", 9, 1, 3)
    second, mu = input_stats(conv, conv, geom, imgs, 4)
    cov, mu_c = input_stats(conv, conv, geom, imgs, 4, centered=True)
    torch.testing.assert_close(mu, x.mean(0).float()[None])
    torch.testing.assert_close(mu_c, mu)

    def blocks(m):
        return torch.stack([m[b * 9:(b + 1) * 9, b * 9:(b + 1) * 9] for b in range(3)])[None].float()

    torch.testing.assert_close(second, blocks(x.T @ x / len(x)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cov, blocks(torch.cov(x.T, correction=0)), rtol=1e-4, atol=1e-5)
    assert float((second - cov).abs().max()) > 0.1  # the inputs have a mean: the two differ


def test_covariance_objective_wins_once_the_mean_shift_is_absorbed():
    """Inputs with a large mean (post-ReLU): fitting the second moment spends the codebook on the
    mean response; the output error that remains after the bias correction is the covariance one."""
    g = torch.Generator().manual_seed(4)
    O, m, d = 64, 8, 8
    w = torch.randn(O, m, d, generator=g)
    x = 4.0 + torch.randn(6000, m, d, generator=g) * torch.linspace(0.2, 1.0, d)
    second = torch.einsum("nbi,nbj->bij", x, x)[None] / len(x)
    xc = x - x.mean(0)
    cov = torch.einsum("nbi,nbj->bij", xc, xc)[None] / len(x)
    by_cov = fit_codebook(w, cov, 16, 15, channel_scale=False)
    by_second = fit_codebook(w, second, 16, 15, channel_scale=False)
    assert weighted_error(w, cov, by_cov.weight()) < 0.8 * weighted_error(w, cov, by_second.weight())


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 24, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))).flatten(1)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_float_target_corrects_the_error_of_the_layers_before(bias_correction):
    """conv1 on a coarse 2-bit grid, conv2 product-quantized: fitted to the float network's output
    of conv2 (target="float") its output is closer to the float network's than when fitted to its
    own float weight on the quantized inputs (target="weight")."""
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    imgs = _images(n=64)
    base = dict(codewords=32, em_iters=10, finetune_steps=0, calib_size=64, stats_size=64,
                bias_correction=bias_correction, selection=LayerSelection(keep=("first",), keep_bits=2))
    errors = {}
    for target in ("weight", "float"):
        plan = search_pq(model, PqSettings(target=target, **base), imgs)
        assert plan.layer("conv1").uniform is not None and plan.layer("conv2").codebook is not None
        q = apply_plan_torch(model, plan)
        with torch.no_grad():
            x = torch.cat(list(as_torch(imgs).batches(64)))
            ref, out = model(x), q(x)
        errors[target] = float((out - ref).pow(2).sum() / ref.pow(2).sum())
        if target == "float" and bias_correction:  # the joint statistics give the error it measures (centered)
            ref, out = (t.reshape(len(x), 24, -1) for t in (ref, out))  # centered per output channel
            ref, out = ref - ref.mean((0, 2), keepdim=True), out - out.mean((0, 2), keepdim=True)
            measured = float((out - ref).pow(2).sum() / ref.pow(2).sum())
            assert plan.layer("conv2").info["float_output_error"] == pytest.approx(measured, rel=1e-3)
    assert errors["float"] < 0.93 * errors["weight"], errors  # 0.86 when written


def test_float_target_is_the_least_squares_weight():
    from cora_onnx.torch.search.pq import float_target

    g = torch.Generator().manual_seed(5)
    xf = torch.randn(3000, 12, generator=g)
    mix = torch.eye(12) + 0.2 * torch.randn(12, 12, generator=g)  # the quantized network's inputs: distorted
    xq = xf @ mix + 0.05 * torch.randn(3000, 12, generator=g)
    w = torch.randn(10, 12, generator=g)
    t = float_target(w, (xq.T @ xq / 3000)[None], (xq.T @ xf / 3000)[None], damping=0.0)
    ls = torch.linalg.lstsq(xq.double(), (xf @ w.T).double()).solution.T.float()
    torch.testing.assert_close(t, ls, rtol=1e-3, atol=1e-4)
    assert float((xq @ t.T - xf @ w.T).norm()) < 0.5 * float((xq @ w.T - xf @ w.T).norm())
    # a group whose inputs are nearly dead on the calibration images (a depthwise channel) keeps its
    # float weight: the ridge is relative to the layer's energy, not the group's
    qq, qf = xq.T @ xq / 3000, xq.T @ xf / 3000
    t2 = float_target(torch.cat([w, w]), torch.stack([qq, 1e-8 * qq]), torch.stack([qf, 1e-8 * qf]))
    torch.testing.assert_close(t2[10:], w, rtol=1e-4, atol=1e-5)
    assert float((t2[:10] - w).norm()) > 0.1 * float(w.norm())
    with pytest.raises(SettingsError, match="target must be one of weight, float"):
        PqSettings(target="output")
