import json

import onnx
import pytest
from click.testing import CliRunner

from cora_onnx.run.api import quantize
from cora_onnx.cli.main import main
from cora_onnx.core.errors import SettingsError
from cora_onnx.onnx.int8 import integer_kernels
from cora_onnx.torch.models import build_model
from report_schema import check_quantize


def test_quantize_with_integer_activations(digits, tmp_path):
    model = build_model(digits.arch, digits.weights)
    res = quantize(model, calib=digits.calib_dir, val=digits.val_dir, bits=4, out=tmp_path / "m.onnx",
                   mean=digits.mean, std=digits.std, input_size=digits.input_size, latency_runs=3, act_bits=8,
                   act_calib="percentile", float_out=tmp_path / "f.onnx")
    r = res.report
    check_quantize(r.to_json(), activations=True)
    act = r["activations"]
    assert act["calibration"] == "percentile" and act["scheme"]["reason"]
    kernels = integer_kernels((tmp_path / "m.onnx").read_bytes())
    assert kernels == act["onnxruntime_kernels"]
    assert kernels["float_compute"] == 0 and kernels["integer"] >= len(res.plan.layers)
    assert r["latency_ms"]["quantized"] > 0 and r["latency_ms"]["quantized_folded"] is None
    # ONNX Runtime integer kernels vs the PyTorch simulation of the same activation grid, tensor by
    # tensor (each from ONNX Runtime's own inputs): one quantization step at most, on few values
    t = r["parity"]["tensors"]
    assert r["verified"] and r["parity"]["reference"] == "simulated" and t["instrumented_exact"]
    worst = t["worst"] or {"max_steps": 0, "mismatch": 0.0}  # None: every value equal
    assert t["first_over"] is None and t["tensors"] >= len(res.plan.layers) and worst["max_steps"] <= 1
    assert worst["mismatch"] < 0.02 and t["output_relative_error"] < 1e-3
    assert r["parity"]["top1_agreement"] >= 99.0
    assert abs(r["top1"]["quantized_onnxruntime"] - r["top1"]["float"]) < 3.0
    assert max(lp.uniform.bits for lp in res.plan.layers) <= act["scheme"]["weight_bits"]
    # bench: interleaved latency with the ratio to the first model, and a top-1 column
    b = CliRunner().invoke(main, ["bench", str(tmp_path / "f.onnx"), str(tmp_path / "m.onnx"), "--runs", "2",
                                  "--data", str(digits.val_dir), "--report", str(tmp_path / "b.json"), "-q"])
    assert b.exit_code == 0, b.output
    lines = b.output.splitlines()
    assert "top-1" in lines[0] and "ratio" in lines[0] and " 1.00x" in lines[1]
    top = json.loads((tmp_path / "b.json").read_text())["top1"]
    assert top[str(tmp_path / "m.onnx")] == pytest.approx(r["top1"]["quantized_onnxruntime"])


def test_cli_act_bits_and_ort_format(digits, tmp_path):
    out, rep = tmp_path / "m.ort", tmp_path / "r.json"
    args = ["quantize", "--model", digits.arch, "--weights", str(digits.weights), "--calib", str(digits.calib_dir),
            "--input-size", str(digits.input_size), "--mean", ",".join(map(str, digits.mean)),
            "--std", ",".join(map(str, digits.std)), "--bits", "8", "--act-bits", "8", "--format", "ort",
            "--out", str(out), "--report", str(rep), "--latency-runs", "2", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "integer" in r.output and "ORT format" in r.output
    report = json.loads(rep.read_text())
    assert out.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier of the ORT format
    assert report["ort_format"]["operator_count"] > 0
    bad = CliRunner().invoke(main, args[:-5] + ["--act-calib", "entropy", "--out", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2


def test_act_bits_needs_calib_and_valid_width(digits, tmp_path):
    model = build_model(digits.arch, digits.weights)
    with pytest.raises(SettingsError, match="calibration images"):
        quantize(model, val=digits.val_dir, out=tmp_path / "m.onnx", act_bits=8, input_size=digits.input_size)
    with pytest.raises(SettingsError, match="act_bits"):
        quantize(model, calib=digits.calib_dir, out=tmp_path / "m.onnx", act_bits=4, input_size=digits.input_size)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("layout", ["auto", "branch"])
def test_cora_adapters_with_integer_activations(digits, tmp_path, layout):
    """W3 CoRa with 8-bit activations. auto (= merge): the adapters are merged into the integer
    weights at load, so the running graph has exactly the kernels of the model without them, the
    file keeps INT4 grids, and parity is against the PyTorch simulation. branch: the adapters are
    capped at the CPU's weight width and run as integer convolutions; parity against float
    activations."""
    from cora_onnx.onnx.int8 import choose_scheme

    model = build_model(digits.arch, digits.weights)
    res = quantize(model, calib=digits.calib_dir, val=digits.val_dir, bits=3, method="cora", out=tmp_path / "m.onnx",
                   mean=digits.mean, std=digits.std, input_size=digits.input_size, latency_runs=2, act_bits=8,
                   iters=20, finetune_iters=5, budget=0.1, adapter_layout=layout, adapter_bits=8,
                   # branch: grouped weights have no integer kernel there (they stay float, warned), so per channel
                   **({"group_size": 0} if layout == "branch" else {}))
    r, width = res.report, choose_scheme().weight_bits
    adapters = [lp.adapter for lp in res.plan.layers if lp.adapter is not None]
    assert adapters and all(a.bits == width for a in adapters)
    k = r["activations"]["onnxruntime_kernels"]
    assert k["float_compute"] == 0 and "quantized_no_adapters" in r["latency_ms"]
    proto = onnx.load(tmp_path / "m.onnx")
    int4 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    if layout == "auto":
        assert r["activations"]["adapter_layout"] == "merge"
        assert k["ops"].get("QLinearConv", 0) + k["ops"].get("QGemm", 0) == len(res.plan.layers)  # no branch kernels
        assert "simulation" in r["activations"]["parity_reference"] and r["parity"]["top1_agreement"] >= 95.0
        assert "quantized_branches" in r["latency_ms"] and len(int4) >= len(res.plan.layers) - 2
        from cora_onnx.onnx.report import format_table

        assert "adapters as branch convolutions" in format_table(r) and "CoRa adapters: merge" in format_table(r)
    else:
        assert r["activations"]["adapter_layout"] == "branch"
        assert k["integer"] >= len(res.plan.layers) + 2 * len(adapters)
        assert "float activations" in r["activations"]["parity_reference"] and r["parity"]["top1_agreement"] >= 90.0


def test_merge_layout_with_float_activations_needs_the_decode_layout(digits, tmp_path):
    model = build_model(digits.arch, digits.weights)
    with pytest.raises(SettingsError, match="adapter layout merge"):
        quantize(model, calib=digits.calib_dir, bits=3, method="cora", out=tmp_path / "m.onnx",
                 input_size=digits.input_size, adapter_layout="merge", weight_layout="qdq")
    assert not (tmp_path / "m.onnx").exists()