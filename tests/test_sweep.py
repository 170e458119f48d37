"""Sweeps on the embedded digits default: in-process and Ray give the same rows, a rerun resumes,
a failing point is recorded, a bad config is one line and exit 2 before any job."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cora_onnx
from cora_onnx.run import api
from cora_onnx.run import outcome
from cora_onnx.run import sweeps as sweep_mod
from cora_onnx.run.sweeps import jobs as sweep_jobs  # where the executors look run_job up
from cora_onnx.cli.main import main
from cora_onnx.core.errors import SettingsError
from cora_onnx.run.sweeps.output import pareto_front

from realdata import SHARED, require_shared

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("latency_ms_b1", "search_seconds", "seconds")
SMALL = {"cora": {"iters": 4, "finetune_iters": 2, "calib_size": 64, "stats_size": 32},
         "pq": {"em_iters": 2, "finetune_steps": 0, "calib_size": 64, "stats_size": 32}}


def config(d, **extra) -> dict:
    """rtn 2/4/8 (grid), cora 4, pq, and a pq point whose block size fits no 1x1 layer (fails at run time)."""
    return {"model": d.arch, "weights": str(d.weights), "calib": str(d.calib_dir), "val": str(d.val_dir),
            "input_size": d.input_size, "mean": list(d.mean), "std": list(d.std), "latency_runs": 1,
            "final_latency_runs": 2, "threads": 1, "torch_threads": 1, "options": SMALL,
            "grid": {"method": ["rtn"], "bits": [2, 4, 8]},
            "points": [{"method": "cora", "bits": 4}, {"method": "pq"},
                       {"method": "pq", "name": "pq-bad", "block_size": "1x1=7"}], **extra}


@pytest.fixture(scope="module")
def first(digits, tmp_path_factory):
    """One in-process sweep; counts float forward passes of the PyTorch model (the reference)."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    calls = []
    real = outcome.predict_torch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(outcome, "predict_torch", lambda m, s, b=32, desc="": calls.append(desc) or real(m, s, b, desc))
        res = cora_onnx.sweep(config(digits), out)
    return res, out, calls


def rows_by_point(out) -> dict:
    return {r["point"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_inprocess_sweep(first):
    res, out, calls = first
    assert calls.count("PyTorch, float") == 1  # the float reference, once for all points
    rows = rows_by_point(out)
    names = [p for p in rows]
    assert names[:3] == ["rtn-w2", "rtn-w4", "rtn-w8"] and names[3].startswith("cora-w4-") and names[-1] == "pq-bad"
    assert res.ran == tuple(names)
    bad = rows.pop("pq-bad")
    assert bad["status"] == "failed" and "block size 7 does not divide" in bad["error"] and "\n" not in bad["error"]
    assert not (out / "pq-bad").exists()
    ref = json.loads((out / "rtn-w4" / "report.json").read_text())
    for name, r in rows.items():
        assert r["status"] == "ok" and r["error"] is None
        size = (out / name / "model.onnx").stat().st_size
        assert r["onnx_bytes"] == size and r["bits_per_weight"] == pytest.approx(size * 8 / ref["weight_params"])
        assert 0 <= r["kl"] and 0 < r["agreement"] <= 100 and 0 < r["top1"] <= 100
    # measured facts of this model: 8 bits follows float, 2 bits does not; 8-bit files are larger
    assert rows["rtn-w8"]["agreement"] > 99 > 90 > rows["rtn-w2"]["agreement"]
    assert rows["rtn-w2"]["kl"] > rows["rtn-w4"]["kl"] > rows["rtn-w8"]["kl"]
    assert rows["rtn-w8"]["onnx_bytes"] > rows["rtn-w4"]["onnx_bytes"]
    # the summary: float first, latency of every finished point from the final interleaved run
    lat = json.loads((out / "latency.json").read_text())
    summary = {r["point"]: r for r in res.rows}
    assert list(summary)[0] == "float" and summary["float"]["agreement"] == 100
    for name in ["float", *rows]:
        assert summary[name]["latency_ms_b1"] == lat[name]["batch_1"]["median_ms"] and lat[name]["batch_1"]["runs"] == 2
    assert summary["pq-bad"]["latency_ms_b1"] is None
    for line_name in rows:
        assert line_name in res.table
    assert "failed: pq-bad: block size 7" in res.table
    assert (out / "table.txt").read_text().strip() == res.table.strip()


def test_pictures(first):
    res, out, _ = first
    page = (out / "sweep.html").read_text()
    assert "<script src" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    ok = [r for r in res.rows if r["status"] == "ok"]
    panels = [ET.fromstring(s) for s in svgs[:2]]
    ns = "{http://www.w3.org/2000/svg}"
    for panel, key in zip(panels, ("agreement", "top1")):
        marks = panel.findall(f"{ns}circle") + panel.findall(f"{ns}rect")[1:]  # first rect: the frame
        assert len(marks) == len(ok)
        ringed = sum(m.get("stroke") == "#d62728" for m in marks)
        assert ringed == len(pareto_front(list(res.rows), key)) >= 1
    data = json.loads(re.search(r'id="sweep-data">(.*?)</script>', page, flags=re.S).group(1))
    assert [r["point"] for r in data] == [r["point"] for r in res.rows]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in res.files
    else:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    rows = [{"point": "a", "onnx_bytes": 10, "agreement": 90}, {"point": "b", "onnx_bytes": 20, "agreement": 95},
            {"point": "c", "onnx_bytes": 30, "agreement": 94}, {"point": "d", "onnx_bytes": 10, "agreement": 80},
            {"point": "e", "onnx_bytes": None, "agreement": None}]
    assert pareto_front(rows, "agreement") == [0, 1]


def test_rerun_resumes(first, digits, monkeypatch):
    res, out, _ = first
    mtimes = {p: (out / p / "model.onnx").stat().st_mtime_ns for p in rows_by_point(out) if p != "pq-bad"}
    ran = []
    real = sweep_mod.run_job
    monkeypatch.setattr(sweep_jobs, "run_job", lambda job: ran.append(job.point.name) or real(job))
    monkeypatch.setattr(api, "float_reference", lambda *a, **k: pytest.fail("float reference recomputed"))
    again = cora_onnx.sweep(config(digits), out)
    assert ran == ["pq-bad"] and again.ran == ("pq-bad",)  # only the failed point is tried again
    assert {p: (out / p / "model.onnx").stat().st_mtime_ns for p in mtimes} == mtimes
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(mtimes) + 2  # one row per point, the failed one twice
    assert [r["point"] for r in again.rows] == [r["point"] for r in res.rows]
    # another model or data into the same folder is refused
    with pytest.raises(SettingsError, match="another model or data"):
        cora_onnx.sweep(config(digits, seed=1), out)


def test_ray_executor_same_rows(first, digits, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'cora-onnx[ray]')")
    _, out, _ = first
    res = cora_onnx.sweep(config(digits), tmp_path / "ray", executor="ray")  # starts and stops a local Ray
    assert not ray.is_initialized()
    a, b = rows_by_point(out), rows_by_point(tmp_path / "ray")
    assert set(a) == set(b) and set(res.ran) == set(b)
    for name in a:
        assert set(a[name]) == set(b[name])
        for k in set(a[name]) - set(TIMINGS):
            x, y = a[name][k], b[name][k]
            assert (x == pytest.approx(y, rel=1e-6, abs=1e-9)) if isinstance(x, float) else x == y, (name, k, x, y)


def test_grid_names_and_yaml(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_ONNX_CACHE", str(digits.weights.parent.parent))
    cfg = sweep_mod.load_config({"grid": {"method": ["rtn", "pq", "cora"], "bits": [4, 8], "budget": [0.05, 0.1]}})
    names = [p.name for p in cfg.points]  # no model: the embedded default; pq has no bits, budget is cora's
    assert names == ["rtn-w4", "rtn-w8", "pq", "cora-w4-b0.05", "cora-w4-b0.1", "cora-w8-b0.05", "cora-w8-b0.1"]
    assert cfg.arch == "digits_cnn" and cfg.input_size == 8
    yaml = pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"grid": {"method": ["rtn"], "bits": [4]}}))
    assert [p.name for p in sweep_mod.load_config(tmp_path / "s.yaml").points] == ["rtn-w4"]


def test_resnet18_protocol_config_parses():
    require_shared()
    cfg = sweep_mod.load_config(ROOT / "tools" / "sweeps" / "resnet18_protocol.toml")
    assert cfg.arch == "resnet18" and cfg.crop_ratio == 0.875 and cfg.class_map is not None
    assert cfg.val == (SHARED / "data" / "imagenet-sample" / "even").resolve()
    got = {(p.method, p.bits, p.act_bits) for p in cfg.points}
    assert got == {("rtn", 8, None), ("rtn", 4, None), ("cora", 4, None), ("cora", 3, None),
                   ("cora", 4, 8), ("pq", None, None)}


BAD = {
    "unknown method": ("[[points]]\nmethod = 'gptq'\nbits = 4\n", "points[0].method: unknown method 'gptq'"),
    "bits out of range": ("[[points]]\nmethod = 'rtn'\nbits = 9\n", "points[0].bits: must be an integer from 2 to 8"),
    "grid bits": ("[grid]\nmethod = ['rtn']\nbits = [4, 1]\n", "grid.bits[1]: must be an integer from 2 to 8"),
    "unknown option": ("[[points]]\nmethod = 'rtn'\nbits = 4\n[[points]]\nmethod = 'rtn'\nbits = 4\nbudget = 0.1\n",
                       "points[1].budget: method rtn has no option 'budget'"),
    "bad option value": ("[[points]]\nmethod = 'cora'\nbits = 4\nbudget = 2.0\n", "points[0]: budget must be"),
    "missing data folder": ("calib = 'nowhere'\n[[points]]\nmethod = 'rtn'\nbits = 4\n", "calib: calib"),
    "unreadable class map": ("class_map = 'junk.json'\n[[points]]\nmethod = 'rtn'\nbits = 4\n", "class_map: class map"),
    "unreadable weights": ("weights = 'junk.pt'\n[[points]]\nmethod = 'rtn'\nbits = 4\n", "s.toml: weights: "),
    "unknown key": ("bogus = 1\n[[points]]\nmethod = 'rtn'\nbits = 4\n", "bogus: unknown setting"),
    "not toml": ("[[points]\nmethod = 'rtn'\n", "is not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_exit_2_before_any_job(case, digits, tmp_path, monkeypatch):
    text, msg = BAD[case]
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    head = {"model": digits.arch, "weights": str(digits.weights), "calib": str(digits.calib_dir),
            "val": str(digits.val_dir), "input_size": 8}
    for key in ("calib", "class_map", "weights"):
        if text.startswith(f"{key} ="):
            head.pop(key, None)
    cfg = tmp_path / "s.toml"
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in head.items()) + text)
    monkeypatch.setattr(sweep_jobs, "run_job", lambda job: pytest.fail("a job started"))
    res = CliRunner().invoke(main, ["sweep", str(cfg), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.startswith("error: ") and "s.toml" in res.output, res.output
    assert res.output.count("\n") == 1, res.output
    assert not (tmp_path / "out").exists()


def test_shared_reference_matches_quantize_own(first, digits, tmp_path):
    """quantize(float_logits=...) scores exactly as quantize computing the float logits itself."""
    from cora_onnx.torch.models import build_model

    _, out, _ = first
    row = rows_by_point(out)["rtn-w4"]
    own = api.quantize(build_model(digits.arch, digits.weights), calib=digits.calib_dir, val=digits.val_dir, bits=4,
                       out=tmp_path / "m.onnx", mean=digits.mean, std=digits.std, input_size=8, latency_runs=1,
                       threads=1).report
    assert own["onnx_bytes"] == row["onnx_bytes"] and own["top1"]["quantized_onnxruntime"] == row["top1"]
    assert own["fidelity_to_float"]["top1_agreement"] == row["agreement"]
    assert own["fidelity_to_float"]["kl_divergence"] == pytest.approx(row["kl"], rel=1e-6)
    with pytest.raises(SettingsError, match="float_logits must have shape"):
        api.quantize(build_model(digits.arch, digits.weights), val=digits.val_dir, out=tmp_path / "x.onnx",
                     mean=digits.mean, std=digits.std, input_size=8, float_logits=np.zeros((3, 10), np.float32))
    assert not (tmp_path / "x.onnx").exists()
