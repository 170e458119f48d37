"""Size targets: every layer's encoding chosen under one byte budget (cora_onnx/torch/search/auto,
cora_onnx/onnx/sizes.py, the size_budget stage, the CLI and sweeps), on the embedded digits model."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import cora_onnx
from cora_onnx.cli.main import main
from cora_onnx.core.encoding import Encoding, encoding_summary
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.models import build_model
from cora_onnx.torch.search.auto import AutoSettings, layer_menu
from cora_onnx.torch.search.auto.settings import FINETUNE_ABOVE, FINETUNE_STEPS
from cora_onnx.torch.search.auto.fit import adapter_factors, adapter_spectrum, fit_encoding, fit_menu, relative_error
from cora_onnx.torch.search.auto.search import _harm_curve

# small enough for a test: few calibration images and EM iterations
SMALL = {"calib_size": 96, "stats_size": 32, "stats_patches": 0, "sens_images": 8, "em_iters": 3, "menu_em_iters": 2}


def _args(d, **kw):
    return dict(calib=d.calib_dir, val=d.val_dir, input_size=d.input_size, mean=d.mean, std=d.std, latency_runs=0,
                threads=1, **kw)


def test_menu_and_labels():
    conv = torch.nn.Conv2d(256, 128, 1)
    menu = layer_menu(conv, AutoSettings())
    labels = [e.label for e in menu]
    assert labels[:7] == ["2-bit", "2-bit g64", "3-bit", "3-bit g64", "4-bit", "4-bit g64", "8-bit"]
    assert {"pq d=2", "pq d=4", "pq d=8"} <= set(labels) and "pq d=16" not in labels
    assert "3-bit g64 + rank 8 4-bit" in labels and "2-bit + rank 16 4-bit" in labels  # 1/16 and 1/8 of rank 128
    assert all(Encoding.parse(label).label == label for label in labels)
    dw = torch.nn.Conv2d(512, 512, 3, groups=512)
    dw_labels = [e.label for e in layer_menu(dw, AutoSettings())]
    assert dw_labels == ["2-bit", "3-bit", "4-bit", "8-bit", "pq d=3", "pq d=9"]  # no groups of 64, no adapters
    assert [e.label for e in layer_menu(conv, AutoSettings(families=("pq",)))] == \
        ["pq d=2", "pq d=4", "pq d=8", "8-bit"]
    assert encoding_summary([Encoding("pq", block=4)] * 3 + [Encoding("uniform", 3, 64, rank=2)] * 2 +
                            [Encoding("uniform", 8)]) == "pq 3 layers, 3-bit 2, 8-bit 1; adapters on 2"


def test_encodings_fit_and_adapters_reclaim_the_residual():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    x = torch.randn(2000, 48) @ torch.randn(48, 48) * 0.3
    H = (x.T @ x / len(x))[None]
    err = {b: fit_encoding(w, Encoding("uniform", b), H).error for b in (2, 3, 4, 8)}
    assert err[2] > err[3] > err[4] > err[8] and err[8] < 1e-4 < err[4] < 0.02
    pq = fit_encoding(w, Encoding("pq", block=4, codewords=64), H, em_iters=5)
    assert pq.codebook is not None and 0 < pq.error < 1
    fit = fit_encoding(w, Encoding("uniform", 2, 16), H)
    spectrum = adapter_spectrum(w, fit.weight, H, damping=0.0)
    assert spectrum[0] == pytest.approx(fit.error, rel=1e-3) and np.all(np.diff(spectrum) <= 1e-12)
    for r in (1, 4, 16):  # the error the singular values promise is the error the factors give
        b, a = adapter_factors(w, fit.weight, H, r, damping=0.0)
        assert relative_error(w, fit.weight + b @ a, H) == pytest.approx(spectrum[r], rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("groups", [1, 4])
def test_the_menu_fitted_at_once_is_the_menu_fitted_one_by_one(groups):
    """fit_menu (the grids below 8 bits clipped and GPTQ-rounded together, one error-feedback
    factor for every codebook) gives each encoding the fit fit_encoding gives it alone."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(16, 32, 3, groups=groups)
    w = conv.weight.detach()
    k = w[0].numel()
    x = torch.randn(groups, 3000, k) @ torch.randn(groups, k, k) * 0.3
    H = x.transpose(1, 2) @ x / x.shape[1]
    menu = layer_menu(conv, AutoSettings())
    together = fit_menu(w, menu, H, em_iters=4, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    alone = {e.label: fit_encoding(w, e, H, em_iters=4, generator=gen) for e in menu if not e.rank}
    assert list(together) != [] and set(together) == set(alone)
    for label, fit in alone.items():
        assert together[label].error == pytest.approx(fit.error, rel=1e-5), label
        torch.testing.assert_close(together[label].weight, fit.weight, rtol=0, atol=1e-6)


def test_harm_curve():
    linear = _harm_curve([(0.1, 0.02)])
    assert linear(0.05) == pytest.approx(0.01) and linear(0.3) == pytest.approx(0.06)
    power = _harm_curve([(0.1, 0.02), (0.4, 0.32)])  # KL x16 for error x4: exponent 2 above the first point
    assert power(0.05) == pytest.approx(0.01) and power(0.2) == pytest.approx(0.08)


@pytest.mark.parametrize("ratio", [2.5, 4, 5.5])
def test_the_file_is_within_every_target_and_shows_its_choice(digits, tmp_path, ratio):
    """The budget holds for every target: the file is at most float / ratio, as predicted; the report
    and `inspect` show each layer's encoding, bytes and harm."""
    out = tmp_path / "m.onnx"
    res = cora_onnx.quantize(build_model(d := digits.arch, digits.weights), **_args(digits), target_ratio=ratio,
                             out=out, model_name=d, **SMALL)
    r = res.report
    st = r["size_target"]
    assert out.stat().st_size == r["onnx_bytes"] == st["bytes"] <= st["limit_bytes"]
    assert st["limit_bytes"] == int(r["float_onnx_bytes"] / ratio)
    assert st["bytes"] == st["predicted_bytes"] and st["within"]  # predicted from the encodings before any fit
    assert r["method"] == "auto" and r["verified"] and r["parity"]["top1_agreement"] == 100
    layers = r["auto"]["layers"]
    assert set(layers) == {lp.name for lp in res.plan.layers}
    assert sum(v["bytes"] for v in layers.values()) == r["auto"]["encodings_bytes"] <= r["auto"]["budget_bytes"]
    assert all(v["harm"] >= 0 and Encoding.parse(v["encoding"]) for v in layers.values())
    # fine-tuned by default only when the choice is predicted to harm the network
    tuned = FINETUNE_STEPS if r["auto"]["predicted_harm"] > FINETUNE_ABOVE else 0
    assert r["auto"]["finetune"]["steps"] == tuned
    searched = r["phases"]["search_phases"]  # each phase of the search in the report
    assert {"statistics", "menu", "sensitivity", "choice", "fit"} <= set(searched)
    assert all(v["seconds"] >= 0 for v in searched.values())
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["cora_onnx.encodings"])["layers"] == {n: v["encoding"] for n, v in layers.items()}
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and r["auto"]["summary"] in shown.output


def test_a_tighter_target_gives_a_smaller_file_and_a_larger_predicted_harm(digits, tmp_path):
    runs = [cora_onnx.quantize(build_model(digits.arch, digits.weights), **_args(digits), target_ratio=t,
                               out=tmp_path / f"{t}.onnx", **SMALL).report for t in (3, 5.5)]
    assert runs[0]["onnx_bytes"] > runs[1]["onnx_bytes"]
    assert runs[0]["auto"]["predicted_harm"] < runs[1]["auto"]["predicted_harm"]


def test_an_impossible_target_is_one_line_and_exit_2_before_any_image(digits, tmp_path, monkeypatch):
    import cora_onnx.run.api as api

    monkeypatch.setattr(api, "load_data", lambda *a, **k: pytest.fail("images were read for an impossible target"))
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["quantize", "--model", digits.arch, "--weights", str(digits.weights), "--calib",
                                    str(digits.calib_dir), "--val", str(digits.val_dir), "--input-size", "8",
                                    "--target-ratio", "40", "--out", str(out), "-q"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: size target 40x") and "out of reach" in lines[0]
    assert "ask for 5." in lines[0]  # the smallest reachable ratio of this model (about 5.9x)
    assert not list(tmp_path.iterdir())


def test_a_linear_the_exporter_writes_as_a_matmul_is_measured(tmp_path):
    """A Linear on a channels-last tensor is exported as a MatMul with its weight transposed under
    a generated name (ConvNeXt's blocks): the measure finds it by its weight's fingerprint, as the
    export does, instead of refusing the target ("no initializer named block.0.weight")."""
    from cora_onnx.run.stages import check_options, size_budget
    from test_zoo import BlockMLP

    torch.manual_seed(0)
    opts = check_options(calib=tmp_path, out=tmp_path / "m.onnx", input_size=16, target_ratio=2)
    budget = size_budget(BlockMLP().eval(), opts)
    costs = budget.table.costs
    assert {"block.0", "block.2"} <= set(costs)
    assert costs["block.0"]["8-bit"] > costs["block.0"]["4-bit"] > 0


@pytest.mark.parametrize("kw,match", [
    (dict(target_ratio=1.0), "target ratio must be a number above 1"),
    (dict(target_size="big"), "target size must be a size"),
    (dict(target_ratio=4, target_size="10kB"), "not both"),
    (dict(target_ratio=4, act_bits=8), "integer activations"),
    (dict(method="auto"), "needs|under a size target"),
    (dict(target_ratio=4, method="pq", blocks="large"), "has no option 'blocks'"),
])
def test_bad_targets_are_refused_before_any_work(tmp_path, kw, match):
    with pytest.raises(SettingsError, match=match):
        cora_onnx.quantize(torch.nn.Linear(3, 2), calib=tmp_path, out=tmp_path / "m.onnx", **kw)


def test_a_method_with_a_target_chooses_among_its_own_encodings(digits, tmp_path):
    r = cora_onnx.quantize(build_model(digits.arch, digits.weights), **_args(digits), method="pq", target_ratio=4,
                           out=tmp_path / "m.onnx", **SMALL).report
    assert r["auto"]["families"] == ["pq"] and r["size_target"]["within"]
    assert {Encoding.parse(v["encoding"]).family for v in r["auto"]["layers"].values()} <= {"pq", "8-bit"}


def test_a_sweep_over_target_ratios(digits, tmp_path):
    """One sweep draws the accuracy-size curve: a point per target, each file within its target."""
    cfg = {"model": digits.arch, "weights": str(digits.weights), "calib": str(digits.calib_dir),
           "val": str(digits.val_dir), "input_size": digits.input_size, "mean": list(digits.mean),
           "std": list(digits.std), "latency_runs": 1, "final_latency_runs": 1, "threads": 1, "torch_threads": 1,
           "options": {"auto": SMALL}, "grid": {"target_ratio": [3, 5]}}
    res = cora_onnx.sweep(cfg, tmp_path / "s")
    rows = {r["point"]: r for r in map(json.loads, (tmp_path / "s" / "results.jsonl").read_text().splitlines())}
    names = list(rows)  # named by target, then a hash of the [options.auto] settings
    assert [n.rsplit("-", 1)[0] for n in names] == ["auto-3x", "auto-5x"] and res.ran == tuple(names)
    for name, ratio in zip(names, (3, 5)):
        row = rows[name]
        report = json.loads((tmp_path / "s" / name / "report.json").read_text())
        assert row["status"] == "ok" and row["onnx_bytes"] <= report["float_onnx_bytes"] / ratio
    assert rows[names[0]]["onnx_bytes"] > rows[names[1]]["onnx_bytes"]


def test_fine_tuning_by_default_only_above_the_harm_threshold():
    s = AutoSettings()
    assert s.finetune_steps is None and s.distill == "kl"
    assert s.finetune_steps_for(FINETUNE_ABOVE) == 0 and s.finetune_steps_for(FINETUNE_ABOVE * 1.01) == FINETUNE_STEPS
    assert AutoSettings(finetune_steps=0).finetune_steps_for(10.0) == 0
    assert AutoSettings(finetune_steps=7).finetune_steps_for(0.0) == 7
    with pytest.raises(SettingsError, match="finetune_steps"):
        AutoSettings(finetune_steps=-1)
    assert s.augment == "none"
    with pytest.raises(SettingsError, match="augment must be one of none, flip, crop, mix"):
        AutoSettings(augment="rotate")


def test_fine_tuning_moves_codewords_and_scales_and_keeps_the_file_within_its_target(digits, tmp_path):
    """Distillation after the choice tunes codewords, grid scales and biases (codes and integers
    stay); the file stays within its target and verifies."""
    runs = {steps: cora_onnx.quantize(build_model(digits.arch, digits.weights), **_args(digits), target_ratio=4,
                                      out=tmp_path / f"m{steps}.onnx", **{**SMALL, "finetune_steps": steps})
            for steps in (0, 3)}
    r = runs[3].report
    ft = r["auto"]["finetune"]
    assert ft["steps"] == 3 and np.isfinite(ft["loss_last"]) and r["size_target"]["within"] and r["verified"]
    before, after = ({lp.name: lp for lp in runs[s].plan.layers} for s in (0, 3))
    moved = {"codewords": 0, "scales": 0}
    for name, lp in after.items():
        old = before[name]
        if lp.codebook is not None:
            assert np.array_equal(lp.codebook.codes, old.codebook.codes)
            moved["codewords"] += not np.array_equal(lp.codebook.codewords, old.codebook.codewords)
        elif lp.uniform is not None and lp.uniform.bits < 8:
            assert np.array_equal(lp.uniform.q, old.uniform.q)
            moved["scales"] += not np.array_equal(lp.uniform.scale, old.uniform.scale)
    assert sum(moved.values()) > 0, moved
    # augmented images (the float model's outputs then per step) tune the same parameters otherwise
    mixed = cora_onnx.quantize(build_model(digits.arch, digits.weights), **_args(digits), target_ratio=4,
                               out=tmp_path / "mix.onnx", **{**SMALL, "finetune_steps": 3, "augment": "mix"})
    assert mixed.report["verified"] and mixed.report["size_target"]["within"]
    tuned = {lp.name: lp for lp in mixed.plan.layers}

    def tuned_part(lp):
        return lp.codebook.codewords if lp.codebook is not None else lp.uniform.scale

    assert any(not np.array_equal(tuned_part(lp), tuned_part(after[n])) for n, lp in tuned.items())


def test_kept_layers_take_their_keep_bits_and_rtn_takes_grids_only():
    from cora_onnx.torch.search.auto import menus_of
    from cora_onnx.torch.search.layers import LayerSelection
    from tinynet import TinyNet

    model = TinyNet()
    menus = menus_of(model, AutoSettings(selection=LayerSelection(keep=("first",), keep_bits=6)))
    assert [e.label for e in menus["conv1"]] == ["6-bit"] and len(menus["pw"]) > 1
    uniform = menus_of(model, AutoSettings(families=("uniform",)))
    assert all(e.kind == "uniform" and not e.rank for m in uniform.values() for e in m)


def test_the_choice_is_fitted_to_the_float_weights_unless_refit(digits):
    """By default each chosen encoding is fitted to the float weight under the float network's input
    statistics (what the menu ranked it by); refit fits later layers to the float output on the
    partially quantized network instead, which gives other weights."""
    from cora_onnx.onnx.data import Preprocess, load_images
    from cora_onnx.torch.search.auto import fit_choice, measure_menu

    model = build_model(digits.arch, digits.weights).eval()
    calib = load_images(digits.calib_dir, Preprocess(digits.input_size, 1.0, digits.mean, digits.std))
    settings = AutoSettings(**SMALL)
    assert settings.refit is False
    measured = measure_menu(model, settings, calib)
    chosen = {n: menu[0] for n, menu in measured.menus.items()}  # the 2-bit grids of every layer
    _, results = fit_choice(model, measured, chosen, settings, calib)
    first = next(iter(measured.layers))
    again = fit_encoding(measured.layers[first].weight.detach().float(), chosen[first], measured.stats[first][0],
                         damping=settings.damping, em_iters=settings.em_iters, generator=torch.Generator().manual_seed(0))
    assert torch.equal(results[first]["fit"].weight, again.weight)
    _, refitted = fit_choice(model, measured, chosen, AutoSettings(**SMALL, refit=True), calib)
    last = list(measured.layers)[-2]  # a conv whose inputs come from quantized layers
    assert not torch.equal(results[last]["fit"].weight, refitted[last]["fit"].weight)
    for r in (*results.values(), *refitted.values()):
        assert np.isfinite(r["error"]) and torch.isfinite(r["bias"]).all()


def test_sensitivity_is_measured_with_the_bias_the_fit_gives(digits):
    """Each reference encoding's KL is the network's with that layer's weight and its corrected bias
    (float output mean kept), as the fitted model will have it; the probe puts the layer back."""
    import copy

    import torch.nn.functional as F

    from cora_onnx.onnx.data import Preprocess, load_images
    from cora_onnx.torch.images import as_torch
    from cora_onnx.torch.search.auto import measure_menu
    from cora_onnx.torch.search.auto.measure import SensitivityProbe
    from cora_onnx.torch.search.auto.search import _corrected_bias
    from cora_onnx.torch.quantizers import quantizable_layers

    model = build_model(digits.arch, digits.weights).eval()
    calib = load_images(digits.calib_dir, Preprocess(digits.input_size, 1.0, digits.mean, digits.std))
    settings = AutoSettings(**SMALL)
    measured = measure_menu(model, settings, calib)
    images = as_torch(calib).subset(settings.calib_size, settings.seed)
    x = images.subset(settings.sens_images, settings.seed + 1).take(np.arange(settings.sens_images))
    probe = SensitivityProbe(model, measured.layers, x)
    with torch.no_grad():
        before = model(x)
    checked = 0
    for n, points in measured.sensitivity.items():
        for p in points:
            w_hat = measured.fits[n][p["encoding"]].weight
            bias = _corrected_bias(measured.layers[n], w_hat, measured.stats[n][1])
            assert p["kl"] == pytest.approx(probe.kl(n, w_hat, bias), rel=1e-9, abs=1e-12)
            other = copy.deepcopy(model)
            layer = quantizable_layers(other)[n]
            with torch.no_grad():
                layer.weight.copy_(w_hat.reshape(layer.weight.shape))
                layer.bias = torch.nn.Parameter(bias)
                lq = F.log_softmax(other(x).double(), 1)
            ref = F.log_softmax(before.double(), 1)
            assert p["kl"] == pytest.approx(float((ref.exp() * (ref - lq)).sum(1).mean()), rel=1e-4, abs=1e-9)
            checked += 1
    with torch.no_grad():
        assert checked and torch.equal(model(x), before)
    # the correction matters: without it the same weights give other KLs
    n, p = next((n, ps[0]) for n, ps in measured.sensitivity.items() if ps)
    assert probe.kl(n, measured.fits[n][p["encoding"]].weight) != pytest.approx(p["kl"], rel=1e-6)
