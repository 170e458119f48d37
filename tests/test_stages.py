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


def _layout(lp):
    """What of a layer's plan decides the graph the passes write, values aside."""
    u, cb = lp.uniform, lp.codebook
    return (None if u is None else (u.bits, u.symmetric, u.per_channel, u.group, u.scale.shape, u.q.dtype.name),
            None if cb is None else (cb.block_size, cb.codes.shape, cb.scale is None))


@pytest.mark.parametrize("method, options", [
    ("rtn", dict(bits=4)),
    ("cora", dict(bits=3, iters=6, calib_size=32, stats_size=32, sens_images=4)),  # default preset: mixed widths
    ("cora", dict(bits=4, preset="reference", iters=6, calib_size=32, adapter_bits=0)),
    ("pq", dict(em_iters=2, finetune_steps=2, calib_size=32, stats_size=16, uniform_layers="features.9:4")),
])
def test_the_rehearsal_plans_what_the_search_plans(digits, method, options):
    """Every layer the search plans is in each rehearsal plan, and one of them gives it the layout
    the search gave it (grid, codebook block size), an adapter where it has one and a bias where
    it corrected one; its message in the log says how long it took."""
    from cora_onnx.core.plan import Plan
    from cora_onnx.onnx.data import Preprocess, load_images
    from cora_onnx.torch.export import fuse_batchnorm
    from cora_onnx.torch.search import METHODS
    from cora_onnx.run.stages import make_settings

    fused = fuse_batchnorm(build_model(digits.arch, digits.weights))
    calib = load_images(digits.calib_dir, Preprocess(digits.input_size, 1.0, digits.mean, digits.std))
    settings = make_settings(method, options.pop("bits", 4), options)
    torch.manual_seed(0)
    real = METHODS[method].run(fused, settings, calib)
    rehearsed = METHODS[method].rehearsal(fused, settings)
    assert all(isinstance(p, Plan) and [lp.name for lp in p.layers] == [lp.name for lp in real.layers]
               for p in rehearsed)
    for lp in real.layers:
        alike = [p.layer(lp.name) for p in rehearsed if _layout(p.layer(lp.name)) == _layout(lp)]
        assert alike, (lp.name, _layout(lp), [_layout(p.layer(lp.name)) for p in rehearsed])
        if lp.adapter is not None:
            assert all(r.adapter is not None and r.adapter.bits == lp.adapter.bits for r in alike), lp.name
        if lp.bias is not None or (lp.codebook is not None and lp.codebook.bias is not None):
            assert all(r.bias is not None or r.codebook.bias is not None for r in alike), lp.name


def test_a_refusing_pass_exits_2_before_the_search(digits, tmp_path, monkeypatch, caplog):
    """A pass that refuses one layer (here WeightQDQPass, made to refuse features.9 as it would a
    graph it cannot rewrite) stops `quantize` before the search: exit 2, one line naming that layer
    (found among the others) and the pass's message, no file; the rehearsal of a graph the passes
    take is logged with its seconds."""
    import dataclasses
    import logging

    from click.testing import CliRunner

    from passes import WeightQDQPass
    from cora_onnx.cli.main import main
    from cora_onnx.core.errors import PlanError
    from cora_onnx.torch import search

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran")

    monkeypatch.setattr(logging.getLogger("cora_onnx"), "propagate", True)  # the CLI's logging setup stops it
    with caplog.at_level(logging.INFO, logger="cora_onnx"):  # a graph the passes take: on to the search
        opts = check_options(calib=digits.calib_dir, out=tmp_path / "m.onnx", method="pq", **_norm(digits))
        monkeypatch.setitem(search.METHODS, "pq", dataclasses.replace(search.METHODS["pq"], run=no_search))
        with pytest.raises(AssertionError, match="the search ran"):
            run_search(build_model(digits.arch, digits.weights), opts, None)
    assert any(r.getMessage().startswith("rehearsal: 1 skeleton plan(s) of 5 layers written into the exported graph "
                                         "in ") for r in caplog.records)

    call = WeightQDQPass.call

    def refuse(self, model):
        if any(lp.name == "features.9" for lp in self.layers):
            raise PlanError("layer features.9: weight feeds Foo, expected Conv")
        return call(self, model)

    monkeypatch.setattr(WeightQDQPass, "call", refuse)
    monkeypatch.setitem(search.METHODS, "rtn", dataclasses.replace(search.METHODS["rtn"], run=no_search))
    out = tmp_path / "m.onnx"
    args = ["quantize", "--model", digits.arch, "--weights", digits.weights, "--calib", digits.calib_dir,
            "--input-size", digits.input_size, "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--out", out, "--latency-runs", 0, "--threads", 1, "-q"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert res.output == ("error: the ONNX passes cannot write what method rtn may plan for layer features.9 (a 4-bit "
                          "grid; rehearsed before the search): weight feeds Foo, expected Conv; leave it in float with "
                          "--skip features.9\n")
    assert not out.exists()
