"""The run options (cora_onnx.core.options.RunOptions): checked at construction, frozen, built
from quantize's keywords in one call, picklable, recorded as JSON. No torch needed."""

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from cora_onnx.core.errors import InputError, SettingsError
from cora_onnx.core.options import IMAGENET_MEAN, RunOptions


@pytest.mark.parametrize("kw, msg", [
    (dict(bits=9), "bits must be an integer from 2 to 8, got 9"),
    (dict(bits="4"), "bits must be an integer"),
    (dict(keep_bits=1), "keep bits must be"),
    (dict(keep="first,middle"), "keep must be a subset"),
    (dict(act_bits=4, calib="."), "act_bits must be one of 8"),
    (dict(act_bits=8), "need calibration images"),
    (dict(adapter_layout="merge", weight_layout="qdq"), "merge with float activations needs weight layout decode"),
    (dict(weight_layout="decode", act_bits=8, calib="."), "weight layout decode is for float activations"),
    (dict(weight_layout="fold"), "weight layout must be one of auto, decode, qdq"),
    (dict(adapter_layout="fold"), "adapter layout must be one of"),
    (dict(act_calib="entropy"), "act_calib"),
    (dict(out_format="tflite"), "output format must be one of onnx, ort"),
    (dict(latency_runs=-1), "latency runs must be >= 0"),
    (dict(latency_batch=0), "latency batch must be >= 1"),
    (dict(batch_size=0), "batch size must be >= 1"),
    (dict(threads=True), "threads must be an integer"),
    (dict(crop_ratio=2.0), "crop ratio"),
    (dict(input_size=0), "input size"),
    (dict(mean="1,2"), "mean needs 1 or 3"),
    (dict(std="a"), "std must be numbers"),
])
def test_bad_values_fail_at_construction(kw, msg):
    with pytest.raises(SettingsError, match=msg):
        RunOptions(**kw)


def test_weight_layout_for():
    """auto writes decode for an ONNX file with float activations, qdq with integer activations or
    the ORT format; an explicit choice stands (decode with integer activations is refused)."""
    from cora_onnx.core.options import weight_layout_for

    assert weight_layout_for("auto", None) == "decode" and weight_layout_for("auto", 8) == "qdq"
    assert weight_layout_for("auto", None, "ort") == "qdq" and weight_layout_for("decode", None, "ort") == "decode"
    assert weight_layout_for("qdq", None) == "qdq"
    assert RunOptions(adapter_layout="merge").adapter_layout == "merge"  # merged into the decoded float weight


def test_paths_are_checked_at_construction(tmp_path):
    with pytest.raises(InputError, match="calibration folder .* does not exist"):
        RunOptions(calib=tmp_path / "nope")
    with pytest.raises(InputError, match="validation folder"):
        RunOptions(val=[tmp_path, tmp_path / "nope"])
    with pytest.raises(InputError, match="class map"):
        RunOptions(class_map=tmp_path / "map.json")
    with pytest.raises(InputError, match="report .* directory .* does not exist"):
        RunOptions(report=tmp_path / "no" / "r.json")
    with pytest.raises(InputError, match="output model .* is a directory"):
        RunOptions(out=tmp_path)


def test_values_are_normalized_and_frozen(tmp_path):
    o = RunOptions(calib=str(tmp_path), val=[tmp_path], out=str(tmp_path / "m.onnx"), keep="first, last",
                   mean="127/255", std=None, skip="fc")
    assert o.calib == (tmp_path,) and o.val == (tmp_path,) and o.out == tmp_path / "m.onnx"
    assert o.keep == ("first", "last") and o.skip == ("fc",)
    assert o.mean == (127 / 255,) * 3 and o.std == RunOptions().std
    assert RunOptions(keep="none").keep == () and RunOptions().keep is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.bits = 3
    with pytest.raises(TypeError):
        o.method_options["budget"] = 1.0
    assert o.preprocess.input_size == 224 and RunOptions(input_size=8).preprocess.input_size == 8


def test_of_splits_method_options_and_resolve_changes_fields():
    o = RunOptions.of(method="cora", bits=3, budget=0.1, iters=5, method_options={"order": 2})
    assert (o.method, o.bits) == ("cora", 3)
    assert dict(o.method_options) == {"order": 2, "budget": 0.1, "iters": 5}
    r = RunOptions.resolve(o, bits=2, budget=0.2)
    assert r.bits == 2 and dict(r.method_options) == {"order": 2, "budget": 0.2, "iters": 5}
    assert RunOptions.resolve(o) is o and RunOptions.resolve(None, bits=5).bits == 5
    with pytest.raises(SettingsError, match="must be a cora_onnx.RunOptions"):
        RunOptions.resolve({"bits": 4})


def test_pickles_and_records_as_json(tmp_path):
    o = RunOptions.of(val=tmp_path, out=tmp_path / "m.onnx", budget=0.1, keep="first")
    again = pickle.loads(pickle.dumps(o))
    assert again == o and dict(again.method_options) == {"budget": 0.1}
    j = json.loads(json.dumps(o.to_json()))
    assert j["val"] == [str(tmp_path)] and j["out"] == str(tmp_path / "m.onnx") and j["keep"] == ["first"]
    assert j["method_options"] == {"budget": 0.1} and j["mean"] == list(IMAGENET_MEAN)
    assert set(j) == {f.name for f in dataclasses.fields(RunOptions)}


def test_every_flagged_option_has_help():
    for f in dataclasses.fields(RunOptions):
        if f.metadata.get("flag"):
            assert f.metadata["flag"].startswith("--") and f.metadata["help"], f.name


def test_cli_options_come_from_the_fields():
    """The click option of a run option carries the field's flag, help and default, under the
    field's name, so `RunOptions(**given)` takes a command's options as they are."""
    import click

    from cora_onnx.cli.main import run_option

    @click.command()
    @run_option("latency_runs")
    @run_option("out_format")
    @run_option("calib")
    def cmd(**given):
        click.echo(json.dumps(RunOptions(**given).to_json()))

    from click.testing import CliRunner

    res = CliRunner().invoke(cmd, ["--latency-runs", "3", "--format", "ort"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["latency_runs"] == 3 and got["out_format"] == "ort" and got["calib"] == []
    assert "Timed runs per model" in CliRunner().invoke(cmd, ["--help"]).output
    assert CliRunner().invoke(cmd, ["--format", "tflite"]).exit_code == 2


def test_a_path_given_as_str_and_as_path_is_the_same_option(tmp_path):
    assert RunOptions(val=str(tmp_path)) == RunOptions(val=Path(tmp_path))
