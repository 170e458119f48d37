import numpy as np
import onnx
import pytest
from onnx import helper

from cora_onnx.onnx.calibrate import CalibSettings, RangeHistogram, collect_histograms, compute_ranges
from cora_onnx.core.errors import DataError, SettingsError


def _stream(chunks, bins=256):
    h = RangeHistogram(bins)
    for c in chunks:
        h.update(c)
    return h


def test_streaming_histogram_matches_data():
    rng = np.random.default_rng(0)
    # ranges that grow over the stream force bin merges
    chunks = [rng.normal(0, s, size=5000).astype(np.float32) for s in (0.01, 0.1, 1.0, 10.0)]
    h = _stream(chunks)
    data = np.concatenate(chunks)
    assert h.min == data.min() and h.max == data.max()
    assert h.total == data.size
    assert h.counts.size <= 2 * h.bins
    edges = (h.k0 + np.arange(h.counts.size + 1)) * h.width
    ref, _ = np.histogram(data, bins=edges)
    np.testing.assert_array_equal(h.counts, ref)  # merged bins are exact, not approximate
    for q in (0.5, 0.99, 0.9999):
        assert abs(h.quantile(q) - np.quantile(data, q)) <= 2 * h.width


def test_nan_activations_rejected():
    with pytest.raises(DataError, match="NaN"):
        RangeHistogram().update(np.array([1.0, np.nan], np.float32))


def _quant_mse(x, lo, hi, levels=256):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (levels - 1)
    zp = np.round(-lo / s)
    q = np.clip(np.round(x / s) + zp, 0, levels - 1)
    return float((((q - zp) * s - x) ** 2).mean())


def test_range_methods_on_heavy_tail():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_t(4, size=200_000)).astype(np.float32)  # ReLU-like, long tail
    h = _stream(np.array_split(x, 10), bins=2048)
    r = {m: compute_ranges({"t": h}, CalibSettings(method=m))["t"] for m in ("minmax", "percentile", "mse")}
    assert r["minmax"] == (h.min, h.max)
    assert r["percentile"][1] < r["minmax"][1]
    assert r["mse"][0] == 0.0 and r["mse"][1] < r["minmax"][1]
    # the MSE range really has the smallest 8-bit error of the three on the data itself
    err = {m: _quant_mse(x, *r[m]) for m in r}
    assert err["mse"] <= min(err["minmax"], err["percentile"]) * 1.02
    assert err["mse"] < 0.95 * err["minmax"]


def test_signed_tensor_keeps_both_sides():
    x = np.random.default_rng(2).normal(1.0, 1.0, 100_000).astype(np.float32)
    lo, hi = compute_ranges({"t": _stream([x])}, CalibSettings(method="mse"))["t"]
    assert lo < -1.0 and hi > 3.0


@pytest.mark.parametrize("kw", [{"method": "entropy"}, {"percentile": 50.0}, {"bins": 2}, {"batch_size": 0}])
def test_bad_settings(kw):
    with pytest.raises(SettingsError):
        CalibSettings(**kw)


def test_collect_histograms_on_onnx_graph():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("two", onnx.TensorProto.FLOAT, [], [2.0])])
    blob = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(4)]
    hists = collect_histograms(blob, ["r", "y"], iter(batches), len(batches), bins=128)
    data = np.concatenate(batches)
    assert hists["r"].max == np.maximum(data, 0).max() and hists["r"].min == 0.0
    assert hists["y"].max == pytest.approx(2 * np.maximum(data, 0).max())
    assert hists["r"].total == data.size
    with pytest.raises(SettingsError, match="not in the model"):
        collect_histograms(blob, ["nope"], iter(batches), 4)


def _conv_model():
    import onnx_ir as ir

    rng = np.random.default_rng(5)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Conv", ["r", "w2", "b2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 6, 6])],
        [onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
         onnx.numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32), "w2"),
         onnx.numpy_helper.from_array(rng.normal(size=2).astype(np.float32), "b2")])
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))


def test_shared_histograms_give_the_same_activation_qdq():
    """add_activation_qdq with the histograms of int8.activation_histograms (one calibration pass
    shared by several range methods, as tools/bench_int8.py does) gives the ranges and the graph
    of its own calibration, for each range method."""
    from passes import QuantScheme

    from cora_onnx.onnx.data import ImageSet, Preprocess
    from cora_onnx.onnx.int8 import activation_histograms, add_activation_qdq
    from cora_onnx.core.modelfile import onnx_bytes

    rng = np.random.default_rng(7)
    images = ImageSet(rng.integers(0, 256, size=(20, 3, 6, 6), dtype=np.uint8), None, ("x",) * 20,
                      Preprocess(input_size=6))
    hists = activation_histograms(_conv_model(), images, CalibSettings(batch_size=8))
    assert hists and all(h.total > 0 for h in hists.values())
    results = {}
    for method in ("minmax", "percentile", "mse"):
        settings = CalibSettings(method=method, batch_size=8)
        own, shared = _conv_model(), _conv_model()
        r_own = add_activation_qdq(own, images, QuantScheme(), settings)
        r_shared = add_activation_qdq(shared, images, QuantScheme(), settings, histograms=hists)
        assert r_own[0] == r_shared[0] and r_own[2] == r_shared[2]
        assert onnx_bytes(own) == onnx_bytes(shared)
        results[method] = r_own[0]
    # the given histograms are what the ranges come from: those of other images give other ranges
    dark = ImageSet(images.images // 4, None, images.paths, images.preprocess)
    other = add_activation_qdq(_conv_model(), images, QuantScheme(), CalibSettings(batch_size=8),
                               histograms=activation_histograms(_conv_model(), dark, CalibSettings(batch_size=8)))
    assert other[0] != results["minmax"]
