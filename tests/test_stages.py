"""The stages of cora_onnx.quantize (cora_onnx.run.stages, cora_onnx.run.outcome) used one by one give
what quantize gives, and each checks its own input."""

import json

import pytest
import torch

from cora_onnx.run.api import quantize
from cora_onnx.core.errors import ModelError, SettingsError
from cora_onnx.torch.models import build_model
from cora_onnx.run.outcome import make_report, verify_quantized, write_outputs
from cora_onnx.run.stages import check_options, export_quantized, load_data, load_model, run_search

TIMES = ("search_seconds", "latency", "latency_ms", "onnx_path", "environment", "options", "phases")


def _norm(d):
    return dict(mean=",".join(map(str, d.mean)), std=",".join(map(str, d.std)), input_size=d.input_size)


def test_stages_one_by_one_give_quantize_s_result(digits, tmp_path):
    kw = dict(calib=digits.calib_dir, val=digits.val_dir, bits=4, method="rtn", latency_runs=0, threads=1,
              model_name=digits.arch, **_norm(digits))
    res = quantize(build_model(digits.arch, digits.weights), out=tmp_path / "q.onnx", **kw)

    opts = check_options(out=tmp_path / "s.onnx", report=tmp_path / "s.json", **kw)
    model = load_model(digits.arch, digits.weights)
    data = load_data(model, opts.pre, digits.calib_dir, digits.val_dir)
    assert len(data.calib) > 0 and len(data.val) == 450 and data.num_classes == 10
    searched = run_search(model, opts, data.calib)
    exported = export_quantized(searched, opts, data.calib)
    verification = verify_quantized(model, exported, data, opts)
    report = make_report(searched, exported, verification, data, opts)
    assert verification.verified and report["verified"]
    assert not (tmp_path / "s.onnx").exists()  # nothing is written before write_outputs
    report = write_outputs(report, searched, exported, verification, opts)  # with the file's bits per weight

    assert (tmp_path / "s.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    assert json.loads((tmp_path / "s.json").read_text())["onnx_bytes"] == res.report["onnx_bytes"]
    drop = lambda r: {k: v for k, v in r.items() if k not in TIMES}  # noqa: E731
    assert json.loads(json.dumps(drop(report))) == json.loads(json.dumps(drop(res.report)))
    paths = ("out", "report")  # the run options in the report differ only by the output paths given
    assert {k: v for k, v in report["options"].items() if k not in paths} == \
        {k: v for k, v in res.report["options"].items() if k not in paths}
    assert report["options"]["out"] == str(tmp_path / "s.onnx") and report["options"]["bits"] == 4


def test_check_options_needs_no_model(tmp_path):
    with pytest.raises(SettingsError, match="unknown method"):
        check_options(val=tmp_path, method="nope")
    with pytest.raises(SettingsError, match="needs calibration images"):
        check_options(val=tmp_path, method="cora")
    with pytest.raises(SettingsError, match="latency runs"):
        check_options(val=tmp_path, latency_runs=-1)
    with pytest.raises(SettingsError, match="give calib or val"):
        check_options()
    opts = check_options(calib=tmp_path, act_bits=8, bits=8, out=tmp_path / "m.onnx")
    assert opts.scheme is not None and opts.bits == opts.scheme.weight_bits and opts.settings.bits == opts.bits


def test_load_model(digits, tiny):
    assert not load_model(digits.arch, digits.weights).training
    with pytest.raises(SettingsError, match="architecture name"):
        load_model(tiny, digits.weights)
    bad = load_model(digits.arch, digits.weights)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    with pytest.raises(ModelError, match="NaN"):
        load_model(bad)
