"""The plan is the whole contract: `export --plan` of a plan saved by `quantize --plan-out` writes
the file quantize wrote (same operators, same initializers, same bytes) for every layout; other
weights are refused by name; old plans load as weight-only plans and say what they lack."""

import collections
import json
import logging

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cora_onnx.cli.main import main
from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import Plan
from cora_onnx.run.api import export_plan, quantize
from cora_onnx.torch.models import build_model


class Wide(nn.Module):
    """A 64 x 64 x 3 x 3 conv (36,864 weights): big enough for the 2-bit grid to be packed in bytes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


CORA = dict(method="cora", bits=3, iters=8, finetune_iters=2, budget=0.1)
LAYOUTS = {
    "weight-only INT4": (None, dict(bits=4)),
    "packed 2-bit grids": ("wide", dict(bits=2)),
    "W8A8": (None, dict(bits=8, act_bits=8)),
    "adapters as branches": (None, CORA),
    "adapters as branches, A8": (None, dict(CORA, act_bits=8, adapter_layout="branch")),
    "adapters merged, A8": (None, dict(CORA, act_bits=8, adapter_layout="merge")),
    "codebooks": (None, dict(method="pq")),
}


def _model(which, digits):
    return Wide().eval() if which == "wide" else build_model(digits.arch, digits.weights)


def _contents(path):
    m = onnx.load(path)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    inits = {t.name: (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer}
    return ops, inits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_plan_rebuilds_the_quantized_file(digits, tmp_path, layout):
    which, extra = LAYOUTS[layout]
    kw = dict(calib=digits.calib_dir, val=digits.val_dir, input_size=digits.input_size, mean=digits.mean,
              std=digits.std, latency_runs=0, threads=1)
    res = quantize(_model(which, digits), out=tmp_path / "q.onnx", plan_out=tmp_path / "plan", **kw, **extra)
    assert res.report["verified"]
    plan = Plan.load(tmp_path / "plan")
    assert (plan.activations is not None) == ("act_bits" in extra)
    merged = "act_bits" in extra and extra.get("adapter_layout", "auto") != "branch"
    assert plan.merge_bits == (res.report["activations"]["scheme"]["weight_bits"] if merged else None)
    rep = export_plan(_model(which, digits), plan, tmp_path / "again.onnx")
    # checked before it is written, against PyTorch with the plan (with A8 the simulation; branches with
    # A8, which have none, exactly without the activation QDQ)
    kind = "simulated" if "act_bits" in extra and (merged or "budget" not in extra) else "exact"
    assert rep["verified"] and rep["parity"]["reference"] == kind and rep["parity"]["images"] == 16
    assert ("tensors" in rep["parity"]) == (kind == "simulated")
    ops, inits = _contents(tmp_path / "q.onnx")
    again_ops, again_inits = _contents(tmp_path / "again.onnx")
    assert again_ops == ops
    assert again_inits.keys() == inits.keys() and all(again_inits[k] == inits[k] for k in inits)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    if which == "wide":  # the layout under test is there
        assert any(k.endswith("_quantized_packed") for k in inits), sorted(inits)


def test_export_cli_rebuilds_w8a8_and_refuses_other_weights(digits, tmp_path):
    """The issue's case through the CLI: the plan of a --bits 8 --act-bits 8 run exports the
    integer-activation file (QuantizeLinear on activations), not a weight-only one; weights other
    than the plan's are named as such."""
    common = ["--model", digits.arch, "--input-size", str(digits.input_size), "-q"]
    args = ["quantize", *common, "--weights", str(digits.weights), "--calib", str(digits.calib_dir), "--val",
            str(digits.val_dir), "--mean", ",".join(map(str, digits.mean)), "--std", ",".join(map(str, digits.std)),
            "--bits", "8", "--act-bits", "8", "--latency-runs", "0", "--out", str(tmp_path / "q.onnx"),
            "--plan-out", str(tmp_path / "plan")]
    assert CliRunner().invoke(main, args).exit_code == 0
    res = CliRunner().invoke(main, ["export", *common, "--weights", str(digits.weights), "--plan",
                                    str(tmp_path / "plan"), "--out", str(tmp_path / "e.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "e.onnx").graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]

    other = {k: v + 0.01 if k.endswith("weight") else v for k, v in torch.load(digits.weights).items()}
    torch.save(other, tmp_path / "other.pt")
    res = CliRunner().invoke(main, ["export", *common, "--weights", str(tmp_path / "other.pt"), "--plan",
                                    str(tmp_path / "plan"), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "not the weights the plan was made from" in res.output and "features.0" in res.output
    assert not (tmp_path / "x.onnx").exists()


def test_other_weights_refused_in_python(digits, tmp_path):
    model = build_model(digits.arch, digits.weights)
    res = quantize(model, val=digits.val_dir, input_size=digits.input_size, out=tmp_path / "q.onnx", latency_runs=0,
                   threads=1, mean=digits.mean, std=digits.std)
    with torch.no_grad():
        model.fc.weight.mul_(2)
    with pytest.raises(PlanError, match="not the weights the plan was made from: layer fc has different values"):
        export_plan(model, res.plan, tmp_path / "e.onnx")


def test_format_1_plans_load_as_weight_only_and_say_what_they_lack(digits, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("cora_onnx"), "propagate", True)  # the CLI's tests stop it there
    model = build_model(digits.arch, digits.weights)
    res = quantize(model, val=digits.val_dir, input_size=digits.input_size, out=tmp_path / "q.onnx", latency_runs=0,
                   threads=1, mean=digits.mean, std=digits.std, bits=4)
    jpath, _ = res.plan.save(tmp_path / "plan")
    doc = json.loads(jpath.read_text())
    doc["format"] = 1
    for key in ("merge_bits", "activations"):
        del doc[key]
    jpath.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="cora_onnx"):
        old = Plan.load(tmp_path / "plan")
    assert old.activations is None and old.merge_bits is None and len(old.layers) == len(res.plan.layers)
    lines = [r.getMessage() for r in caplog.records if "plan format 1" in r.getMessage()]
    assert len(lines) == 1 and "calibrated ranges" in lines[0] and "merge width" in lines[0]
    export_plan(model, old, tmp_path / "e.onnx")
    assert (tmp_path / "e.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()  # a weight-only plan loses nothing


def test_activation_plan_round_trips_exactly(tmp_path):
    from cora_onnx.core.plan import ActivationPlan, LayerPlan

    ranges = {"x": (np.float32(-0.1234567), np.float32(3.3)), "y": (0.0, 1e-7)}
    act = ActivationPlan("uint8", 7, ranges, calibration="mse", reason="test")
    plan = Plan("rtn", {}, (LayerPlan("fc", "linear", (2, 2)),), merge_bits=7, activations=act)
    plan.save(tmp_path / "p")
    back = Plan.load(tmp_path / "p")
    assert back.merge_bits == 7 and back.activations.ranges == act.ranges
    assert (back.activations.act_dtype, back.activations.weight_bits, back.activations.calibration) == ("uint8", 7, "mse")
    with pytest.raises(PlanError, match="low <= high"):
        ActivationPlan("uint8", 8, {"x": (1.0, 0.0)})
    with pytest.raises(PlanError, match="merge_bits"):
        Plan("rtn", {}, (), merge_bits=4)
