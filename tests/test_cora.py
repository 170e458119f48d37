"""CoRa search: settings, loss, budget, export parity, full-rank exactness, CLI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cora_onnx.cli.main import main
from cora_onnx.onnx.data import Preprocess, load_images
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes, quantizable_layers
from cora_onnx.torch.models import build_model
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import LayerPlan, LowRankAdapter, Plan
from cora_onnx.torch.quantizers import QuantSpec, quantize_weight
from cora_onnx.torch.search import uniform_from
from cora_onnx.torch.search.cora import CoraSettings, butterworth, search_cora


@pytest.fixture(scope="module")
def setup(digits):
    model = fuse_batchnorm(build_model(digits.arch, digits.weights))
    pre = Preprocess(digits.input_size, 1.0, digits.mean, digits.std)
    calib = load_images(digits.calib_dir, pre)
    return model, calib


def _ort(blob, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def searched(setup):
    model, calib = setup
    plan = search_cora(model, CoraSettings(bits=2, budget=0.08, iters=80, finetune_iters=30), calib)
    return model, calib, plan


def test_search_lowers_the_loss(searched):
    _, _, plan = searched
    hist = plan.meta["cora"]["loss_history"]
    assert len(hist) == 80
    assert np.mean(hist[-10:]) < 0.8 * np.mean(hist[:10])


def test_budget_respected(setup):
    model, calib = setup
    weight_params = sum(m.weight.numel() for m in quantizable_layers(model).values())
    for budget in (0.01, 0.05):
        plan = search_cora(model, CoraSettings(bits=3, budget=budget, iters=20, finetune_iters=0), calib)
        used = sum(lp.adapter.params for lp in plan.layers if lp.adapter is not None)
        assert used == plan.meta["cora"]["adapter_params"] and used <= budget * weight_params
        assert sum(lp.adapter is not None for lp in plan.layers) >= (1 if budget == 0.05 else 0)


def test_export_parity_and_report_bits(searched, tmp_path):
    model, calib, plan = searched
    assert any(lp.adapter is not None and lp.adapter.bits == 4 for lp in plan.layers)  # 2-bit weights: 4-bit adapters
    blob = onnx_bytes(apply_plan(export_onnx(model, 8), plan))
    x = torch.from_numpy(next(calib.batches(64)))
    with torch.no_grad():
        ref = apply_plan_torch(model, plan)(x).numpy()
    out = _ort(blob, x.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert (out.argmax(1) == ref.argmax(1)).all()
    # the plan round-trips through disk and exports to the same bytes
    plan.save(tmp_path / "p")
    again = Plan.load(tmp_path / "p")
    assert onnx_bytes(apply_plan(export_onnx(model, 8), again)) == blob


def test_full_rank_float_adapter_reproduces_the_float_conv(setup):
    model, _ = setup
    layers = quantizable_layers(model)
    plans = []
    for name, mod in layers.items():
        if not isinstance(mod, torch.nn.Conv2d) or mod.groups != 1:
            continue
        w = mod.weight.detach()
        qt = quantize_weight(w, QuantSpec(bits=2))
        r = (w - qt.dequantize()).reshape(w.shape[0], -1).double()
        u, s, vt = torch.linalg.svd(r, full_matrices=False)
        a = (s.sqrt()[:, None] * vt).float().reshape((len(s),) + tuple(w.shape[1:]))
        b = (u * s.sqrt()).float().reshape(w.shape[0], len(s), 1, 1)
        plans.append(LayerPlan(name=name, kind="conv", shape=tuple(w.shape), uniform=uniform_from(qt),
                               adapter=LowRankAdapter(rank=len(s), a=a.numpy(), b=b.numpy())))
    plan = Plan("cora", {}, tuple(plans))
    blob = onnx_bytes(apply_plan(export_onnx(model, 8), plan))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        flt = model(x).numpy()
        without = apply_plan_torch(model, Plan("rtn", {}, tuple(LayerPlan(name=p.name, kind=p.kind, shape=p.shape,
                                                                          uniform=p.uniform) for p in plans)))(x).numpy()
    out = _ort(blob, x.numpy())
    np.testing.assert_allclose(out, flt, atol=2e-4, rtol=1e-4)
    assert np.abs(without - flt).max() > 100 * np.abs(out - flt).max()  # the 2-bit model alone is far off


def test_butterworth_is_a_low_pass():
    t = butterworth(torch.tensor(0.25), 100, 4)
    assert t[0] > 0.99 and abs(float(t[24]) - 2 ** -0.5) < 1e-6 and t[-1] < 0.01
    assert torch.all(t[1:] <= t[:-1])


@pytest.mark.parametrize("kw,word", [({"budget": 1.5}, "budget"), ({"iters": 10, "finetune_iters": 20}, "finetune_iters"),
                                     ({"adapter_bits": 9}, "adapter_bits"), ({"preset": "paper"}, "preset"),
                                     ({"order": 0}, "order"), ({"bits": 1}, "bits"), ({"rounding": "up"}, "rounding")])
def test_bad_settings(kw, word):
    with pytest.raises(SettingsError, match=word):
        CoraSettings(**kw)


def test_adapter_bits_follow_the_weight_bits():
    assert (CoraSettings(bits=4).adapter_bits, CoraSettings(bits=3).adapter_bits, CoraSettings(bits=2).adapter_bits) \
        == (8, 4, 4)
    assert CoraSettings(bits=3, adapter_bits=8).adapter_bits == 8 and CoraSettings(bits=3, adapter_bits=0).adapter_bits == 0


def test_presets_fill_unset_fields():
    ref = CoraSettings(preset="reference")
    assert (ref.per_channel, ref.symmetric, ref.clip, ref.svd, ref.stats, ref.finetune_iters) == \
        (False, False, "std", "weight", "none", 0)
    assert CoraSettings(preset="reference", per_channel=True).per_channel is True


def test_cli_cora_and_option_checks(digits, tmp_path):
    base = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--bits", 3, "-q"]
    runner = CliRunner()
    bad = runner.invoke(main, [str(a) for a in base + ["--method", "rtn", "--budget", 0.1, "--out", tmp_path / "x.onnx"]])
    assert bad.exit_code == 2 and "--budget does not apply to --method rtn" in bad.output
    assert not (tmp_path / "x.onnx").exists()
    bad = runner.invoke(main, [str(a) for a in base + ["--method", "cora", "--budget", 2, "--out", tmp_path / "x.onnx"]])
    assert bad.exit_code == 2 and "budget" in bad.output and not (tmp_path / "x.onnx").exists()
    ok = runner.invoke(main, [str(a) for a in base + ["--method", "cora", "--budget", 0.05, "--iters", 30,
                                                      "--finetune-iters", 10, "--out", tmp_path / "c.onnx",
                                                      "--report", tmp_path / "r.json", "--latency-runs", 2]])
    assert ok.exit_code == 0, ok.output
    r = json.loads((tmp_path / "r.json").read_text())
    cora = r["cora"]
    assert cora["iterations"] == 30 and cora["budget"] == 0.05 and cora["adapter_params"] <= 0.05 * r["weight_params"]
    assert set(cora["ranks"]) and r["parity"]["top1_agreement"] >= 99.5
    assert 3 < r["effective_bits"] < 32
    assert "quantized_no_adapters" in r["latency_ms"]
    # weight-only default: grids decoded and adapters merged into the float weights at load (no
    # branch convolution in the file), the branch layout timed beside it
    assert "quantized_branches" in r["latency_ms"] and any("weight layout decode" in n for n in r["notes"])
    ops = [n.op_type for n in onnx.load(tmp_path / "c.onnx").graph.node]
    assert ops.count("Conv") + ops.count("Gemm") == len(r["layers"]) and "DequantizeLinear" not in ops
    shown = runner.invoke(main, ["inspect", str(tmp_path / "c.onnx")])
    assert "rank=" in shown.output and "adapter_bytes=" in shown.output


def test_fixed_classifier_keeps_its_bias_and_grid(setup):
    """--no-fit-classifier: no per-class statistics correction or bias tuning on Linear layers."""
    model, calib = setup
    fc = [n for n, m in quantizable_layers(model).items() if isinstance(m, torch.nn.Linear)]
    kw = dict(bits=3, budget=0.05, iters=10, finetune_iters=5)
    fitted = {lp.name: lp for lp in search_cora(model, CoraSettings(**kw), calib).layers}
    fixed = {lp.name: lp for lp in search_cora(model, CoraSettings(fit_classifier=False, **kw), calib).layers}
    plain = quantize_weight(quantizable_layers(model)[fc[0]].weight.detach(), CoraSettings(**kw).spec(8))
    assert fc and fitted[fc[0]].bias is not None  # the default corrects the classifier
    assert fixed[fc[0]].bias is None
    assert np.allclose(fixed[fc[0]].uniform.scale, plain.scale.numpy())
    assert any(fixed[n].bias is not None for n in fixed if n not in fc)  # convs are still corrected


# issue 14 levers: augmentation, logit MSE, layer-output matching, no bias fine-tuning

@pytest.mark.parametrize("kw,word", [({"augment": "rotate"}, "augment"), ({"distill": "l1"}, "distill"),
                                     ({"features": "all"}, "features"), ({"feature_weight": 0}, "feature_weight"),
                                     ({"finetune_biases": "no"}, "finetune_biases")])
def test_bad_lever_settings(kw, word):
    with pytest.raises(SettingsError, match=word):
        CoraSettings(**kw)


def test_augment_batch():
    from cora_onnx.torch.search.cora import augment_batch

    x = torch.randn(8, 3, 12, 12)
    assert augment_batch(x, "none", torch.Generator().manual_seed(0)) is x
    flip = augment_batch(x, "flip", torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(f, i.flip(2))) for f, i in zip(flip, x)]
    assert all(torch.equal(f, i) or fl for f, i, fl in zip(flip, x, flipped)) and 0 < sum(flipped) < 8
    crop = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    assert crop.shape == x.shape and not torch.equal(crop, x) and not torch.equal(crop, flip)
    assert torch.equal(crop, augment_batch(x, "crop", torch.Generator().manual_seed(0)))  # seeded
    # mix: a constant image per batch entry blends into a value between its own and its neighbour's
    c = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 12, 12).contiguous()
    mixed = augment_batch(c, "mix", torch.Generator().manual_seed(1))
    own, other = torch.arange(8.0), torch.arange(8.0).roll(1)
    v = mixed[:, 0, 0, 0]
    assert torch.allclose(mixed, v.view(8, 1, 1, 1).expand_as(mixed))
    assert torch.all(v >= torch.minimum(own, other) - 1e-5) and torch.all(v <= torch.maximum(own, other) + 1e-5)
    assert not torch.allclose(v, own)


def test_feature_loss_adds_to_the_first_step(setup):
    """Without augmentation the first batch and student are the same, so the layer-output term adds
    weight x (its value) to the first loss: doubling the weight doubles the added part."""
    model, calib = setup
    kw = dict(bits=2, budget=0.05, iters=2, finetune_iters=0)
    h = [search_cora(model, CoraSettings(**kw, **extra), calib).meta["cora"]["loss_history"][0]
         for extra in ({}, {"features": "layers"}, {"features": "layers", "feature_weight": 2.0})]
    assert h[1] - h[0] > 1e-3
    assert abs((h[2] - h[0]) - 2 * (h[1] - h[0])) < 1e-3 * (h[1] - h[0]) + 1e-4


def test_mse_distillation_and_augmentation_learn(setup):
    model, calib = setup
    kw = dict(bits=2, budget=0.08, iters=60, finetune_iters=30)
    base = search_cora(model, CoraSettings(**kw, distill="kl"), calib)
    for extra in ({"distill": "mse"}, {"augment": "mix", "features": "layers"}):
        plan = search_cora(model, CoraSettings(**kw, **extra), calib)
        hist = plan.meta["cora"]["loss_history"]
        assert np.mean(hist[-10:]) < 0.9 * np.mean(hist[:10]), extra
        assert hist[0] != base.meta["cora"]["loss_history"][0]  # another loss, or other images
        assert plan.meta["cora"]["adapter_params"] <= 0.08 * plan.meta["cora"]["weight_params"]


def test_no_bias_finetuning_keeps_every_bias(setup):
    model, calib = setup
    kw = dict(bits=3, budget=0.05, iters=10, finetune_iters=5)
    tuned = search_cora(model, CoraSettings(**kw), calib)
    frozen = search_cora(model, CoraSettings(finetune_biases=False, **kw), calib)
    assert any(lp.bias is not None for lp in tuned.layers)
    assert all(lp.bias is None for lp in frozen.layers)
    assert any(lp.adapter is not None for lp in frozen.layers)


def test_gain_finetuning_moves_the_grid_scales_and_exports_with_parity(setup):
    model, calib = setup
    kw = dict(bits=3, budget=0.05, iters=12, finetune_iters=8, finetune_biases=False, group_size=0)  # gains: per channel
    plain = search_cora(model, CoraSettings(**kw), calib)
    tuned = search_cora(model, CoraSettings(finetune_gains=True, **kw), calib)
    moved = [not np.allclose(a.uniform.scale, b.uniform.scale) for a, b in zip(plain.layers, tuned.layers)]
    assert any(moved)
    for a, b in zip(plain.layers, tuned.layers):  # the same integer grid: only the scales move
        np.testing.assert_array_equal(a.uniform.q, b.uniform.q)
    blob = onnx_bytes(apply_plan(export_onnx(model, 8), tuned))
    x = torch.from_numpy(next(calib.batches(64)))
    with torch.no_grad():
        ref = apply_plan_torch(model, tuned)(x).numpy()
    np.testing.assert_allclose(_ort(blob, x.numpy()), ref, atol=1e-4, rtol=1e-4)


def test_cli_lever_options(digits, tmp_path):
    base = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--bits", 3, "--method", "cora", "-q", "--latency-runs", 1]
    runner = CliRunner()
    bad = runner.invoke(main, [str(a) for a in base + ["--augment", "rotate", "--out", tmp_path / "x.onnx"]])
    assert bad.exit_code == 2 and "--augment" in bad.output and not (tmp_path / "x.onnx").exists()
    ok = runner.invoke(main, [str(a) for a in base + ["--iters", 12, "--finetune-iters", 4, "--augment", "crop",
                                                      "--distill", "mse", "--features", "layers", "--feature-weight",
                                                      0.5, "--no-finetune-biases", "--stats-images", 40, "--cov-rows", 2,
                                                      "--gptq-passes", 2, "--act-order", "--clip-metric", "input",
                                                      "--mixed-bits", "none", "--out", tmp_path / "c.onnx",
                                                      "--report", tmp_path / "r.json"]])
    assert ok.exit_code == 0, ok.output
    s = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert (s["augment"], s["distill"], s["features"], s["feature_weight"], s["finetune_biases"]) == \
        ("crop", "mse", "layers", 0.5, False)
    assert (s["stats_size"], s["cov_rows"], s["gptq_passes"], s["act_order"], s["clip_metric"], s["mixed_bits"]) == \
        (40, 2.0, 2, True, "input", [])
    bad = runner.invoke(main, [str(a) for a in base + ["--gptq-passes", 0, "--out", tmp_path / "y.onnx"]])
    assert bad.exit_code == 2 and "gptq_passes" in bad.output and not (tmp_path / "y.onnx").exists()


def test_phases_and_teacher_logits_shared_with_the_statistics_pass(setup):
    """Every phase's seconds are in the plan; the steps' teacher logits of the statistics images are
    the statistics pass's, the others computed: both the float network's logits of those images."""
    from cora_onnx.core.progress import Phases
    from cora_onnx.torch.images import as_torch
    from cora_onnx.torch.search.cora.search import _Search, _teacher_logits

    model, calib = setup
    plan = search_cora(model, CoraSettings(bits=3, iters=6, finetune_iters=2, stats_size=64, calib_size=200), calib)
    assert {"statistics", "grids", "sensitivity", "teacher logits", "rank search", "fine-tuning"} <= set(plan.meta["phases"])
    assert all(v["seconds"] >= 0 and v["cpu_seconds"] >= 0 for v in plan.meta["phases"].values())
    images = as_torch(calib)
    known = torch.tensor([1, 4, 7])
    with torch.no_grad():
        direct = model(images.preprocess.normalize(images.images[:10]))
    st = _Search(CoraSettings(bits=3), model, {}, {}, [], images, 1, known_logits=(known, direct[known] + 1.0))
    out = _teacher_logits(st, torch.arange(10), bs=4)
    mark = torch.zeros(10, dtype=torch.bool)
    mark[known] = True
    torch.testing.assert_close(out[mark], direct[known] + 1.0)  # taken, not recomputed
    torch.testing.assert_close(out[~mark], direct[~mark], rtol=1e-5, atol=1e-5)
    assert st.phases.record["teacher logits"]
