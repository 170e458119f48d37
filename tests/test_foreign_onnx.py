"""ONNX files as people have them (issue 18): one small trained ConvNet (the embedded digits
model, 8x8 input) exported the common ways, each run through `rewrite`, `eval`, `bench` and
`inspect` on the command line. Every run either works (and the rewritten model agrees with the
float file in ONNX Runtime) or ends with one `error:` line and exit code 2; never a traceback."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cora_onnx.cli.main import main

SOURCES = ("dynamo_fixed_external", "legacy_dynamic", "legacy_opset11", "legacy_opset12", "custom_input_name", "nhwc",
           "rewritten_ort")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean(res, ok: bool | None = None):
    """Exit 0, or exit 2 with one `error:` line; no traceback either way."""
    assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    if ok is not None:
        assert (res.exit_code == 0) == ok, res.output


class NHWC(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.permute(0, 3, 1, 2))


def legacy_export(*args, **kwargs) -> None:
    """torch.onnx.export with the legacy TorchScript exporter (dynamo=False), deliberately: these
    files stand for what users' older exporters wrote (opsets 11 and 12, dynamic_axes, their own
    input names), which the dynamo exporter does not write. Its DeprecationWarnings (the exporter
    itself and its logging setup) are expected here and filtered here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx(\.|$)")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(*args, dynamo=False, **kwargs)


@pytest.fixture(scope="module")
def net(digits):
    from cora_onnx.torch.archs.digits import digits_cnn

    m = digits_cnn()
    m.load_state_dict(torch.load(digits.weights))
    return m.eval()


@pytest.fixture(scope="module")
def norm(digits):
    return ["--mean", ",".join(map(str, digits.mean)), "--std", ",".join(map(str, digits.std))]


@pytest.fixture(scope="module")
def files(net, digits, norm, tmp_path_factory):
    """Source name -> model file, each exported the way its name says (checked here)."""
    import copy

    torch.set_num_threads(1)
    net = copy.deepcopy(net)  # an exporter may leave the module in training mode
    d = tmp_path_factory.mktemp("exports")
    x = torch.zeros(1, 3, 8, 8)
    out = {}
    (d / "dynamo").mkdir()
    p = out["dynamo_fixed_external"] = d / "dynamo" / "model.onnx"
    torch.onnx.export(net, (x,), p, dynamo=True, external_data=True)  # the exporter's defaults
    p = out["legacy_dynamic"] = d / "legacy_dynamic.onnx"
    legacy_export(net, (x,), p, input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    for opset in (11, 12):
        p = out[f"legacy_opset{opset}"] = d / f"legacy_opset{opset}.onnx"
        legacy_export(net, (x,), p, opset_version=opset, input_names=["data"])
    p = out["custom_input_name"] = d / "custom.onnx"
    legacy_export(net, (x,), p, input_names=["pixel_values"], output_names=["scores"],
                  dynamic_axes={"pixel_values": {0: "batch"}})
    p = out["nhwc"] = d / "nhwc.onnx"
    legacy_export(NHWC(net), (torch.zeros(1, 8, 8, 3),), p, input_names=["image"], dynamic_axes={"image": {0: "N"}})
    p = out["rewritten_ort"] = d / "rewritten.ort"
    res = run("rewrite", out["legacy_dynamic"], "--out", p, "--bits", 8, "--format", "ort", "-q")
    assert res.exit_code == 0, res.output

    def shape(f):
        i = onnx.load(f, load_external_data=False).graph.input[0]
        return i.name, [dd.dim_value or dd.dim_param for dd in i.type.tensor_type.shape.dim]

    proto = onnx.load(out["dynamo_fixed_external"], load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert (d / "dynamo" / "model.onnx.data").is_file() and shape(out["dynamo_fixed_external"])[1][0] == 1
    assert shape(out["legacy_dynamic"]) == ("input", ["N", 3, 8, 8])
    for opset in (11, 12):
        assert onnx.load(out[f"legacy_opset{opset}"]).opset_import[0].version == opset
    assert shape(out["custom_input_name"])[0] == "pixel_values" and shape(out["nhwc"])[1] == ["N", 8, 8, 3]
    assert p.read_bytes()[4:8] == b"ORTM"
    return out


@pytest.fixture(scope="module")
def val(digits):
    from cora_onnx.onnx.data import Preprocess, load_images

    return load_images(digits.val_dir, Preprocess(8, 1.0, digits.mean, digits.std), labelled=True)


@pytest.fixture(scope="module")
def torch_pred(net, val):
    with torch.no_grad():
        return torch.cat([net.eval()(torch.from_numpy(x)) for x in val.batches(64)]).argmax(1).numpy()


def ort_pred(path, val):
    from cora_onnx.core.modelfile import read_model
    from cora_onnx.onnx.verify import predict_onnx, session

    return predict_onnx(session(read_model(path), threads=1), val).argmax(1)


@pytest.fixture(scope="module")
def float_pred(files, val, torch_pred):
    """Each float file's predictions in ONNX Runtime; first checked against PyTorch (so the
    batch and layout handling that feeds them is checked too)."""
    out = {}
    for k, p in files.items():
        out[k] = ort_pred(p, val)
        if k != "rewritten_ort":
            assert (out[k] == torch_pred).mean() >= 0.995, k
    return out


REWRITES = {"w4": ["--bits", 4], "w8": ["--bits", 8], "w8a8": ["--bits", 8, "--act-bits", 8]}


@pytest.mark.parametrize("how", list(REWRITES))
@pytest.mark.parametrize("source", SOURCES)
def test_rewrite(source, how, files, float_pred, val, digits, norm, tmp_path):
    src = files[source]
    out = tmp_path / ("q.onnx")
    calib = ["--calib", digits.calib_dir] if how == "w8a8" else []
    res = run("rewrite", src, "--out", out, *REWRITES[how], *calib, *norm, "--threads", 1, "--report",
              tmp_path / "r.json")
    assert_clean(res, ok=source != "rewritten_ort")
    if source == "rewritten_ort":
        assert "ORT-format file" in res.output and not out.exists()
        return
    r = json.loads((tmp_path / "r.json").read_text())
    on_disk = sum(f.stat().st_size for f in src.parent.iterdir() if f.name.startswith(src.name))
    assert r["input_bytes"] == on_disk  # the external data file counts
    assert f"from {on_disk / 1e6:.2f} MB" in res.output
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith("q.")] == ["q.onnx"]  # self-contained
    assert r["output_bytes"] == out.stat().st_size
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(out).graph.initializer)
    if source.startswith("legacy_opset") or how == "w4" and source != "rewritten_ort":
        u = r["opset_upgrade"]  # to 13 for 8-bit weights, 21 for INT4
        assert u["to"] == (21 if how == "w4" else 13) and u["max_abs_diff"] <= 1e-4 and "upgraded" in res.output
    agree = (ort_pred(out, val) == float_pred[source]).mean()
    assert agree >= (0.99 if how != "w4" else 0.95), (source, how, agree)
    if how == "w8a8":
        assert r["activations"]["onnxruntime_kernels"]["integer"] >= 5
    if source == "dynamo_fixed_external":
        assert "batch fixed at 1" in res.output


@pytest.mark.parametrize("source", SOURCES)
def test_eval(source, files, norm, digits, torch_pred, val, float_pred):
    res = run("eval", files[source], "--data", digits.val_dir, *norm, "--threads", 1, "-q")
    assert_clean(res, ok=True)
    acc = float(re.search(r"top-1 ([\d.]+)%", res.output).group(1))
    assert acc == pytest.approx((float_pred[source] == val.labels).mean() * 100, abs=0.006)
    if source != "rewritten_ort":  # the float files: PyTorch's top-1
        assert acc == pytest.approx((torch_pred == val.labels).mean() * 100, abs=0.5)
    fixed = source in ("dynamo_fixed_external", "legacy_opset11", "legacy_opset12")
    assert ("batch fixed at 1" in res.output) == fixed
    assert ("NHWC" in res.output) == (source == "nhwc")


@pytest.mark.parametrize("source", SOURCES)
def test_bench(source, files, digits):
    res = run("bench", files[source], "--runs", 2, "--warmup", 1, "--threads", 1, "--data", digits.val_dir)
    assert_clean(res, ok=True)
    assert "batch 1 median" in res.output and re.search(r"\d+\.\d\d%", res.output)
    fixed = source in ("dynamo_fixed_external", "legacy_opset11", "legacy_opset12")
    res = run("bench", files[source], "--runs", 2, "--warmup", 1, "--threads", 1, "--batch", 1, "--batch", 2)
    assert_clean(res, ok=not fixed)
    if fixed:
        assert "fixed at 1" in res.output and "--batch 2" in res.output


@pytest.mark.parametrize("source", SOURCES)
def test_inspect(source, files):
    p = files[source]
    res = run("inspect", p, "--json")
    assert_clean(res, ok=True)
    info = json.loads(res.output)
    on_disk = sum(f.stat().st_size for f in p.parent.iterdir() if f.name.startswith(p.name))
    assert info["file_bytes"] == on_disk
    if source == "dynamo_fixed_external":
        assert info["external_data"] == {"model.onnx.data": (p.parent / "model.onnx.data").stat().st_size}
    if source == "rewritten_ort":
        assert info["format"] == "ort" and info["ops"]["DequantizeLinear"] == 5
        assert info["initializers"]["INT8"]["bytes"] > 8000 and any("ORT format" in n for n in info["notes"])
    else:
        assert info["ops"]["Conv"] == 4 and info["initializers"]["FLOAT"]["bytes"] > 30000
    res = run("inspect", p)
    assert_clean(res, ok=True)
    assert f"{on_disk / 1e6:.2f} MB on disk" in res.output


def test_external_data_from_another_folder(files, digits, norm, tmp_path, monkeypatch):
    """Relative paths from elsewhere: the external data is found beside the model."""
    import os

    src = files["dynamo_fixed_external"]
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(src, tmp_path)
    res = run("rewrite", rel, "--out", "q.onnx", "--bits", 8, "-q")
    assert_clean(res, ok=True)
    res = run("eval", rel, "--data", digits.val_dir, *norm, "--threads", 1, "-q")
    assert_clean(res, ok=True)


def test_missing_external_data_is_one_line(files, tmp_path):
    import shutil

    shutil.copy(files["dynamo_fixed_external"], tmp_path / "model.onnx")  # without model.onnx.data
    for cmd in (["rewrite", tmp_path / "model.onnx", "--out", tmp_path / "q.onnx"], ["inspect", tmp_path / "model.onnx"],
                ["bench", tmp_path / "model.onnx"]):
        res = run(*cmd)
        assert_clean(res, ok=False)
        assert "model.onnx.data" in res.output and "not beside the model" in res.output
    assert not (tmp_path / "q.onnx").exists()


def test_large_output_gets_external_data(files, val, float_pred, tmp_path, monkeypatch):
    """Over the 2 GB limit (lowered here) the rewritten model keeps its weights beside it."""
    import cora_onnx.onnx.rewrite as rw

    monkeypatch.setattr(rw, "SELF_CONTAINED_LIMIT", 1000)
    out = tmp_path / "big.onnx"
    res = run("rewrite", files["legacy_dynamic"], "--out", out, "--bits", 8, "--report", tmp_path / "r.json")
    assert_clean(res, ok=True)
    assert (tmp_path / "big.onnx.data").is_file() and "+ big.onnx.data" in res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["output_bytes"] == out.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    assert (ort_pred(out, val) == float_pred["legacy_dynamic"]).mean() >= 0.99
    assert not list(tmp_path.glob(".*.tmp"))
    res = run("rewrite", files["legacy_dynamic"], "--out", tmp_path / "o.ort", "--format", "ort")
    assert_clean(res, ok=False)
    assert "2 GB" in res.output and not (tmp_path / "o.ort").exists()


def test_opset_upgrade_refusals(files, tmp_path, monkeypatch):
    """An opset the converter cannot convert, or a conversion that changes the outputs: one line."""
    from onnx import version_converter

    real = version_converter.convert_version

    def fail(model, target):
        raise RuntimeError("convert.cc:101: Op 'Foo' has no registered schema\nmore")

    monkeypatch.setattr(version_converter, "convert_version", fail)
    res = run("rewrite", files["legacy_opset11"], "--out", tmp_path / "q.onnx", "--bits", 8)
    assert_clean(res, ok=False)
    assert "opset 11 cannot be converted to opset 13" in res.output

    def changed(model, target):
        new = real(model, target)
        w = new.graph.initializer[0]
        arr = onnx.numpy_helper.to_array(w) * 1.5
        w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
        return new

    monkeypatch.setattr(version_converter, "convert_version", changed)
    res = run("rewrite", files["legacy_opset12"], "--out", tmp_path / "q.onnx", "--bits", 8)
    assert_clean(res, ok=False)
    assert "changed the model's outputs" in res.output and not (tmp_path / "q.onnx").exists()


def _graph(tmp_path, name, in_shape, out_shape, nodes, inits=()):
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, in_shape)],
                               [onnx.helper.make_tensor_value_info("y", 1, out_shape)], list(inits))
    p = tmp_path / name
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), p)
    return p


def test_inputs_and_outputs_a_model_cannot_take(tmp_path, digits, norm, files):
    """Layouts that are not images, sizes that do not fit, and outputs that are not a classifier
    over the folder's classes: one line each."""
    w3 = onnx.numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    two_d = _graph(tmp_path, "flat.onnx", ["N", 4], ["N", 4], [onnx.helper.make_node("Relu", ["x"], ["y"])])
    w5 = onnx.numpy_helper.from_array(np.ones((5, 5, 1, 1), np.float32), "w")
    five = _graph(tmp_path, "five.onnx", ["N", 5, 8, 8], ["N", 5, 8, 8], [onnx.helper.make_node("Conv", ["x", "w"], ["y"])],
                  [w5])
    fmap = _graph(tmp_path, "fmap.onnx", ["N", 3, 8, 8], ["N", 3, 8, 8], [onnx.helper.make_node("Conv", ["x", "w"], ["y"])],
                  [w3])
    w = onnx.numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    three = _graph(tmp_path, "three.onnx", ["N", 3, 8, 8], ["N", 3],
                   [onnx.helper.make_node("GlobalAveragePool", ["x"], ["p"]), onnx.helper.make_node("Flatten", ["p"], ["f"]),
                    onnx.helper.make_node("Gemm", ["f", "w"], ["y"])], [w])
    cmap = tmp_path / "cmap.json"
    cmap.write_text(json.dumps({str(i): i for i in range(10)}))
    cases = [
        (["eval", two_d, "--data", digits.val_dir], "N x 3 x H x W (NCHW) or N x H x W x 3 (NHWC)"),
        (["eval", five, "--data", digits.val_dir], "not 3 colour channels"),
        (["bench", five], "N x 3 x H x W (NCHW)"),
        (["rewrite", five, "--out", tmp_path / "q.onnx", "--act-bits", 8, "--calib", digits.calib_dir], "not 3 colour"),
        (["eval", fmap, "--data", digits.val_dir], "is not a classifier"),
        (["eval", three, "--data", digits.val_dir, "--class-map", cmap, *norm],
         "not a classifier over the classes of"),
        (["eval", files["dynamo_fixed_external"], "--data", digits.val_dir, "--input-size", 16],
         "takes 8x8 images (fixed in the model)"),
    ]
    for cmd, msg in cases:
        res = run(*cmd)
        assert_clean(res, ok=False)
        assert msg in res.output, (cmd[:2], res.output)
    assert not (tmp_path / "q.onnx").exists()


def test_fixed_batch_of_four(net, digits, norm, val, torch_pred, tmp_path):
    """A batch fixed at 4: eval pads the last chunk (450 images), rewrite calibrates 4 at a time,
    bench times batch 4 only."""
    import copy

    p = tmp_path / "b4.onnx"
    legacy_export(copy.deepcopy(net), (torch.zeros(4, 3, 8, 8),), p, input_names=["x"])
    res = run("eval", p, "--data", digits.val_dir, *norm, "--threads", 1, "-q")
    assert_clean(res, ok=True)
    assert "batch fixed at 4 in the model: run 4 images at a time" in res.output
    assert (ort_pred(p, val) == torch_pred).mean() >= 0.995 and len(ort_pred(p, val)) == len(val) == 450
    res = run("rewrite", p, "--out", tmp_path / "q.onnx", "--act-bits", 8, "--calib", digits.calib_dir, *norm,
              "--threads", 1, "-q")
    assert_clean(res, ok=True)
    assert (ort_pred(tmp_path / "q.onnx", val) == torch_pred).mean() >= 0.99
    assert_clean(run("bench", p, "--batch", 4, "--runs", 2, "--threads", 1), ok=True)
    res = run("bench", p, "--runs", 2, "--threads", 1)
    assert_clean(res, ok=False)
    assert "fixed at 4" in res.output


def test_truncated_files_are_one_line(files, digits, tmp_path):
    for name, src in (("cut.ort", files["rewritten_ort"]), ("cut.onnx", files["legacy_dynamic"])):
        p = tmp_path / name
        p.write_bytes(src.read_bytes()[:3000])
        for cmd in (["inspect", p], ["eval", p, "--data", digits.val_dir], ["bench", p],
                    ["rewrite", p, "--out", tmp_path / "q.onnx"]):
            res = run(*cmd)
            assert_clean(res, ok=False)
            assert str(p) in res.output, res.output
