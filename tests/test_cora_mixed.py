"""CoRa with per-layer widths under the bytes of uniform bits (cora_onnx/search/cora/mixed.py)."""

import itertools
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cora_onnx.cli.main import main
from cora_onnx.onnx.data import Preprocess, load_images
from cora_onnx.core.errors import SettingsError
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.torch.models import build_model
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.torch.search.cora import CoraSettings, search_cora
from cora_onnx.torch.search.cora.mixed import choose_bits, parse_mixed_bits, storage_bits


def _costs(harm, counts):
    return {n: {b: counts[n] * storage_bits(b) for b in harm[n]} for n in harm}


def _brute(harm, counts, budget):
    return _brute_costs(harm, _costs(harm, counts), budget)


def _brute_costs(harm, costs, budget):
    names = list(harm)
    best = None
    for combo in itertools.product(*(sorted(harm[n]) for n in names)):
        cost = sum(costs[n][b] for n, b in zip(names, combo))
        value = sum(harm[n][b] for n, b in zip(names, combo))
        if cost <= budget and (best is None or value < best[0] - 1e-15):
            best = (value, dict(zip(names, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_choose_bits_is_the_best_choice_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(6)]
    counts = {n: int(rng.integers(100, 5000)) for n in names}
    # harm falls with width, at layer-dependent rates
    harm = {n: {b: float(rng.uniform(0.1, 10) * 4.0 ** -b) for b in (2, 3, 4, 8)} for n in names}
    budget = sum(c * 3 for c in counts.values())  # uniform 3-bit bytes
    chosen = choose_bits(harm, _costs(harm, counts), budget)
    cost = sum(counts[n] * storage_bits(b) for n, b in chosen.items())
    value = sum(harm[n][b] for n, b in chosen.items())
    best_value, _ = _brute(harm, counts, budget)
    assert cost <= budget
    assert value == pytest.approx(best_value, rel=1e-12)
    assert value <= sum(harm[n][3] for n in names) + 1e-15  # never worse than uniform 3-bit


def test_choose_bits_thinned_frontier_stays_within_the_budget():
    rng = np.random.default_rng(1)
    names = [f"l{i}" for i in range(40)]
    counts = {n: int(rng.integers(100, 50000)) for n in names}
    harm = {n: {b: float(rng.uniform(0.1, 10) * 4.0 ** -b) for b in (2, 3, 4, 8)} for n in names}
    budget = sum(c * 4 for c in counts.values())
    chosen = choose_bits(harm, _costs(harm, counts), budget, max_points=200)
    assert sum(counts[n] * storage_bits(b) for n, b in chosen.items()) <= budget
    assert sum(harm[n][b] for n, b in chosen.items()) <= sum(harm[n][4] for n in names) * 1.05


def test_uniform_fits_its_own_budget_exactly():
    counts = {"a": 4608, "b": 2048}
    harm = {"a": {2: 9.0, 3: 1.0, 4: 0.5}, "b": {2: 9.0, 3: 1.0, 4: 0.5}}
    assert choose_bits(harm, _costs(harm, counts), 3 * (4608 + 2048)) == {"a": 3, "b": 3}


def test_presets_mixed_bits():
    assert CoraSettings(bits=3).mixed_bits == (2, 3, 4, 8)  # the default preset
    assert CoraSettings(bits=3, preset="reference").mixed_bits == ()
    assert CoraSettings(bits=3, mixed_bits="none").mixed_bits == ()


def test_parse_and_check_mixed_bits():
    assert parse_mixed_bits("8,2, 4,3") == (2, 3, 4, 8) and parse_mixed_bits("none") == ()
    assert CoraSettings(bits=3, mixed_bits="2,3,4,8").mixed_bits == (2, 3, 4, 8)
    with pytest.raises(SettingsError, match="mixed bits"):
        CoraSettings(bits=3, mixed_bits="4,8")  # nothing as cheap as 3 bits
    with pytest.raises(SettingsError, match="mixed bits"):
        CoraSettings(bits=3, mixed_bits="2,9")
    with pytest.raises(SettingsError, match="mixed bits"):
        CoraSettings(bits=3, mixed_bits="two,three")
    with pytest.raises(SettingsError, match="gptq_passes"):
        CoraSettings(bits=3, mixed_bits="2,3,4", gptq_passes=2)
    with pytest.raises(SettingsError, match="sens_images"):
        CoraSettings(bits=3, mixed_bits="2,3,4", sens_images=0)


def test_check_mixed_budget():
    assert CoraSettings(bits=2, mixed_budget=2.3).mixed_budget == 2.3
    with pytest.raises(SettingsError, match="mixed budget"):
        CoraSettings(bits=2, mixed_budget=0.5)
    with pytest.raises(SettingsError, match="mixed budget"):
        CoraSettings(bits=2, mixed_budget=9)
    with pytest.raises(SettingsError, match="mixed budget needs mixed bits"):
        CoraSettings(bits=2, mixed_bits="none", mixed_budget=2.5)
    with pytest.raises(SettingsError, match="cannot fit a budget of 2.5"):
        CoraSettings(bits=2, mixed_bits="3,4", mixed_budget=2.5)
    CoraSettings(bits=2, mixed_bits="3,4", mixed_budget=3)  # 3 bits store in 3: fits


@pytest.fixture(scope="module")
def mixed(digits):
    model = fuse_batchnorm(build_model(digits.arch, digits.weights))
    calib = load_images(digits.calib_dir, Preprocess(digits.input_size, 1.0, digits.mean, digits.std))
    s = CoraSettings(bits=3, budget=0.05, iters=20, finetune_iters=10, mixed_bits=(2, 3, 4, 8))
    return model, calib, search_cora(model, s, calib)


def test_mixed_plan_costs_no_more_than_uniform(mixed):
    model, calib, plan = mixed
    info = plan.meta["cora"]["mixed_bits"]
    planned = {lp.name: lp for lp in plan.layers}
    assert info["bits"] and set(info["bits"]) <= set(planned)
    for name, b in info["bits"].items():
        assert planned[name].uniform.bits == b and b in (2, 3, 4, 8)
        assert set(info["kl_alone"][name]) == {2, 3, 4, 8} or set(info["kl_alone"][name]) == {"2", "3", "4", "8"}
    from cora_onnx.torch.search.cora.mixed import layer_cost

    def cost(n, b):  # the widths below 8 bits carry the default preset's float16 scales per 64 weights
        q = planned[n].uniform.q
        return layer_cost(q.size, q.shape[0], b, 64)

    used = sum(cost(n, b) for n, b in info["bits"].items())
    assert used / 8 == info["used_bytes"] <= info["budget_bytes"] == sum(cost(n, 3) for n in info["bits"]) / 8
    for n, b in info["bits"].items():
        assert planned[n].uniform.group == (64 if b < 8 else 0)
        assert planned[n].uniform.stored_bits() == cost(n, b) + (32 * planned[n].uniform.q.shape[0] if b == 8 else 0) \
            + (b * planned[n].uniform.q.shape[0] if b == 8 else 0)  # 8 bits: per-channel float32 scales, zero points
    # the choice has the least summed measured harm among the choices within the budget
    harm = {n: {int(b): v for b, v in info["kl_alone"][n].items()} for n in info["bits"]}
    costs = {n: {b: cost(n, b) for b in harm[n]} for n in harm}
    best, _ = _brute_costs(harm, costs, info["budget_bytes"] * 8)
    assert sum(harm[n][b] for n, b in info["bits"].items()) == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_mixed_plan_exports_with_parity(mixed):
    model, calib, plan = mixed
    blob = onnx_bytes(apply_plan(export_onnx(model, 8), plan))
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    x = torch.from_numpy(next(calib.batches(64)))
    with torch.no_grad():
        ref = apply_plan_torch(model, plan)(x).numpy()
    import onnxruntime as ort

    out = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_cli_mixed_bits(digits, tmp_path):
    base = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--bits", 3, "-q", "--method", "cora", "--iters", 10,
            "--latency-runs", 0]
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    res = runner.invoke(main, [*map(str, base), "--mixed-bits", "2,3,4,8", "--out", str(out),
                               "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["cora"]["mixed_bits"]["bits"].values()) <= {2, 3, 4, 8}
    bad = tmp_path / "bad.onnx"
    res = runner.invoke(main, [*map(str, base), "--mixed-bits", "5,6", "--out", str(bad)])
    assert res.exit_code == 2 and "mixed bits" in res.output and not bad.exists()
    res = runner.invoke(main, [*map(str, base), "--mixed-budget", "0.5", "--out", str(bad)])
    assert res.exit_code == 2 and "mixed budget" in res.output and not bad.exists()


def test_mixed_budget_spends_more_bytes(digits, mixed):
    """--mixed-budget 4.5 at --bits 3: the widths may cost up to 4.5 stored bits per weight, and with
    harm falling with width they use more bytes than uniform 3 bits (the plan's own budget)."""
    model, calib, plan3 = mixed
    s = CoraSettings(bits=3, budget=0.05, iters=4, finetune_iters=2, mixed_bits=(2, 3, 4, 8), mixed_budget=4.5)
    info = search_cora(model, s, calib).meta["cora"]["mixed_bits"]
    base = plan3.meta["cora"]["mixed_bits"]
    # the uniform budget: 3 bits plus the default preset's float16 scales per 64 weights (short rows here)
    assert info["budget_bits_per_weight"] == 4.5 and 3 < base["budget_bits_per_weight"] < 4
    assert info["budget_bytes"] == pytest.approx(base["budget_bytes"] / base["budget_bits_per_weight"] * 4.5)
    assert base["used_bytes"] < info["used_bytes"] <= info["budget_bytes"]


def test_layer_cost_counts_group_scales():
    from cora_onnx.torch.search.cora.mixed import layer_cost

    assert layer_cost(512 * 4608, 512, 4, 0) == 512 * 4608 * 4
    assert layer_cost(512 * 4608, 512, 4, 64) == 512 * 4608 * 4 + 16 * 512 * 72
    assert layer_cost(5 * 27, 5, 3, 8) == 5 * 27 * 3 + 16 * 5 * 4  # 27 = 3 groups of 8 + one of 3
    assert layer_cost(5 * 27, 5, 8, 8) == 5 * 27 * 8  # 8 bits: per channel


def test_group_size_settings():
    s = CoraSettings(bits=4)  # the default preset: groups of 64
    assert s.group_size == 64 and s.spec(4).group == 64 and s.spec(8).group == 0
    assert CoraSettings(bits=4, preset="reference").group_size == 0
    assert CoraSettings(bits=4, stats="float").group_size == 0  # the preset's groups step aside
    assert CoraSettings(bits=4, group_size=0).spec(4).group == 0
    with pytest.raises(SettingsError, match="group"):
        CoraSettings(bits=4, group_size=1)
    with pytest.raises(SettingsError, match="group"):
        CoraSettings(bits=4, group_size=64, preset="reference")  # per tensor, asymmetric
    with pytest.raises(SettingsError, match="gains"):
        CoraSettings(bits=4, group_size=64, finetune_gains=True)


def test_cli_group_size(digits, tmp_path):
    """--group-size through the product path: the widths below 8 bits carry float16 scales per group
    (in the default decode layout: repeated along each row and multiplied in by the Mul that
    replaced the blocked DequantizeLinear, which keeps its facts), ONNX Runtime agrees with PyTorch
    (checked on every run), and the report counts the scales in the widths' bytes."""
    base = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--bits", 3, "-q", "--method", "cora", "--iters", 10,
            "--latency-runs", 0, "--group-size", 8]
    out = tmp_path / "g.onnx"
    res = CliRunner().invoke(main, [*map(str, base), "--out", str(out), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"]["top1_agreement"] >= 99.5
    model = onnx.load(out)
    facts = [{p.key: p.value for p in n.metadata_props} for n in model.graph.node if n.op_type == "Mul"]
    blocked = [f for f in facts if f.get("cora_onnx.group") == "8" and f.get("cora_onnx.granularity") == "per_group"
               and (f.get("cora_onnx.decoded_from") == "WeightQDQPass" or f.get("cora_onnx.pass") == "AdapterMergePass")]
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    low = [b for b in report["cora"]["mixed_bits"]["bits"].values() if b < 8]
    assert len(blocked) == len(low) > 0
    info = report["cora"]["mixed_bits"]
    assert info["used_bytes"] <= info["budget_bytes"]
    bad = tmp_path / "bad.onnx"
    res = CliRunner().invoke(main, [*map(str, base[:-2]), "--group-size", "1", "--out", str(bad)])
    assert res.exit_code == 2 and "group" in res.output and not bad.exists()
