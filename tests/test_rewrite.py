import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cora_onnx.cli.main import main
from cora_onnx.core.errors import OnnxModelError
from cora_onnx.onnx.int8 import integer_kernels
from cora_onnx.core.npgrid import quantize_symmetric
from cora_onnx.torch.quantizers import QuantSpec, quantize_weight
from cora_onnx.onnx.rewrite import rewrite_onnx
from report_schema import ACTIVATIONS, REWRITE, check


@pytest.fixture
def float_onnx(tiny, tmp_path):
    """TinyNet exported with BatchNormalization kept (no optimization), as a user's exporter would."""
    path = tmp_path / "tiny_float.onnx"
    torch.onnx.export(tiny, (torch.zeros(1, 3, 8, 8),), dynamo=True, opset_version=18, optimize=False).save(str(path))
    assert "BatchNormalization" in {n.op_type for n in onnx.load(path).graph.node}
    return path


@pytest.fixture
def calib_dir(tmp_path):
    d = tmp_path / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("bits", [3, 8])
def test_numpy_grid_matches_torch_quantizer(bits):
    w = torch.randn(6, 4, 3, 3)
    q, scale = quantize_symmetric(w.numpy(), bits, clip="mse")
    ref = quantize_weight(w, QuantSpec(bits=bits, clip="mse"))
    np.testing.assert_allclose(scale, ref.scale.numpy(), rtol=1e-6)
    assert (q == ref.q.numpy()).mean() > 0.999


@pytest.mark.parametrize("layout", ["auto", "qdq"])
def test_rewrite_weights_only(tiny, float_onnx, tmp_path, layout):
    """Weight-only rewrite: by default (auto = decode) every weight is its INT8 grid decoded by
    Cast and Mul, which ONNX Runtime folds at load; qdq writes DequantizeLinear nodes. The same
    weights either way."""
    outs = {}
    for lay in ("qdq", layout):
        outs[lay] = tmp_path / f"w8-{lay}.onnx"
        res = rewrite_onnx(float_onnx, out=outs[lay], bits=8, weight_layout=lay)
    ops = [n.op_type for n in onnx.load(outs[layout]).graph.node]
    assert res.report["batchnorm_fused"] == 1 and "BatchNormalization" not in ops
    assert len(res.report["layers"]) == 4
    assert ops.count("DequantizeLinear") == (4 if layout == "qdq" else 0)
    assert ops.count("Mul") == (0 if layout == "qdq" else 4)
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = tiny(torch.from_numpy(x)).numpy()
    got = _run(outs[layout], x)
    assert 0 < np.abs(got - ref).max() < 0.01 * np.abs(ref).max() + 1e-3
    np.testing.assert_allclose(got, _run(outs["qdq"], x), rtol=1e-6, atol=1e-6)


def test_rewrite_cli_integer_activations_and_ort_format(tiny, float_onnx, calib_dir, tmp_path):
    out, rep = tmp_path / "w8a8.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["rewrite", str(float_onnx), "--out", str(out), "--bits", "8", "--act-bits", "8",
                                  "--calib", str(calib_dir), "--input-size", "8", "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["activations"]["onnxruntime_kernels"]["float_compute"] == 0
    k = integer_kernels(out.read_bytes())
    assert k["integer"] == 5 and k["float_compute"] == 0  # 3 convs, the global average pool, the classifier
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = tiny(torch.from_numpy(x)).numpy()
    assert np.abs(_run(out, x) - ref).max() < 0.1 * np.abs(ref).max()
    ort_out = tmp_path / "w8a8.ort"
    r = CliRunner().invoke(main, ["rewrite", str(float_onnx), "--out", str(ort_out), "--act-bits", "8",
                                  "--calib", str(calib_dir), "--format", "ort", "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    ops = json.loads(rep.read_text())["ort_format"]["operators"]
    assert "QLinearConv" in sum((v for d in ops.values() for v in d.values()), [])
    np.testing.assert_allclose(_run(ort_out, x), _run(out, x), atol=1e-5)  # loads and agrees


def _model_file(tmp_path, nodes, opset=18, name="m.onnx"):
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 4])],
                               [onnx.helper.make_tensor_value_info("y", 1, [1, 4])])
    p = tmp_path / name
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)]), p)
    return p


@pytest.mark.parametrize("case,message", [
    ("text", "not a valid ONNX model"),
    ("no_conv", "no Conv, Gemm or MatMul"),
    ("new_opset", "opset 24 is newer than this tool handles"),
    ("missing", "does not exist"),
])
def test_bad_input_rejected(tmp_path, case, message):
    if case == "text":
        src = tmp_path / "notes.onnx"
        src.write_text("this is not a model")
    elif case == "no_conv":
        src = _model_file(tmp_path, [onnx.helper.make_node("Relu", ["x"], ["y"])])
    elif case == "new_opset":
        w = onnx.helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32)))
        src = _model_file(tmp_path, [w, onnx.helper.make_node("Gemm", ["x", "w"], ["y"])], opset=24)
    else:
        src = tmp_path / "absent.onnx"
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(main, ["rewrite", str(src), "--out", str(out), "--bits", "8"])
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and message in r.output and r.output.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.onnx.*"))
    if case != "missing":
        with pytest.raises(Exception) as exc:
            rewrite_onnx(src, out=out, bits=8)
        assert isinstance(exc.value, OnnxModelError)


def test_act_bits_without_calib_rejected(float_onnx, calib_dir, tmp_path):
    r = CliRunner().invoke(main, ["rewrite", str(float_onnx), "--out", str(tmp_path / "o.onnx"), "--act-bits", "8"])
    assert r.exit_code == 2 and "--calib" in r.output
    r = CliRunner().invoke(main, ["rewrite", str(float_onnx), "--out", str(tmp_path / "o.onnx"), "--act-bits", "8",
                                  "--calib", str(calib_dir), "--weight-layout", "decode"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "weight layout decode" in r.output
    assert not (tmp_path / "o.onnx").exists()


def test_rewrite_several_calib_folders(float_onnx, calib_dir, tmp_path):
    """--calib repeats (the folders are mixed); the report gives the file's bits per weight."""
    more = tmp_path / "more"
    more.mkdir()
    rng = np.random.default_rng(5)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(more / f"{i}.png")
    out, rep = tmp_path / "w8a8.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["rewrite", str(float_onnx), "--out", str(out), "--act-bits", "8", "--calib",
                                  str(calib_dir), "--calib", str(more), "--input-size", "8", "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    check(report, REWRITE)
    check(report["activations"], ACTIVATIONS, "report.activations")
    assert report["activations"]["calib_images"] == 24 + 5
    assert report["file_bits_per_weight"] == pytest.approx(out.stat().st_size * 8 / report["weight_params"])
    assert f"{report['file_bits_per_weight']:.2f} file bits per weight" in r.output
    r = CliRunner().invoke(main, ["rewrite", str(float_onnx), "--out", str(tmp_path / "x.onnx"), "--act-bits", "8",
                                  "--calib", str(calib_dir), "--calib", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "nowhere does not exist" in r.output
    assert not (tmp_path / "x.onnx").exists()
