import json

import numpy as np
import pytest

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import LayerPlan, Plan, UniformWeights


def _layer(name="conv", bits=4, symmetric=True):
    rng = np.random.default_rng(0)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    dt = np.int8 if symmetric else np.uint8
    q = rng.integers(lo, hi + 1, size=(4, 2, 3, 3)).astype(dt)
    u = UniformWeights(bits, symmetric, True, q, np.full(4, 0.1, np.float32), np.zeros(4, dt))
    return LayerPlan(name, "conv", (4, 2, 3, 3), uniform=u, info={"err": 0.5})


def test_roundtrip(tmp_path):
    plan = Plan("rtn", {"bits": 4}, (_layer("a"), _layer("b", 6, False)), meta={"input_size": 8})
    jp, npz = plan.save(tmp_path / "p")
    assert jp.name == "p.json" and npz.name == "p.npz"
    back = Plan.load(tmp_path / "p.json")
    assert back.method == "rtn" and back.meta["input_size"] == 8
    for a, b in zip(plan.layers, back.layers):
        assert a.name == b.name and a.shape == b.shape and dict(a.info) == dict(b.info)
        np.testing.assert_array_equal(a.uniform.q, b.uniform.q)
        assert b.uniform.q.dtype == a.uniform.q.dtype
        np.testing.assert_array_equal(a.uniform.dequantize(), b.uniform.dequantize())


def test_validation():
    with pytest.raises(PlanError, match="grid"):
        UniformWeights(2, True, True, np.full((2, 2), 3, np.int8), np.ones(2, np.float32), np.zeros(2, np.int8))
    with pytest.raises(PlanError, match="shape"):
        LayerPlan("x", "conv", (3, 2, 3, 3), uniform=_layer().uniform)
    with pytest.raises(PlanError, match="duplicate"):
        Plan("rtn", {}, (_layer(), _layer()))


def test_malformed_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    np.savez(tmp_path / "bad.npz")
    with pytest.raises(PlanError, match="unreadable"):
        Plan.load(tmp_path / "bad")


def test_fingerprint_roundtrip_and_old_plans(tmp_path):
    from cora_onnx.core.plan import WeightFingerprint

    w = np.random.default_rng(1).standard_normal((4, 2, 3, 3)).astype(np.float32)
    plan = Plan("rtn", {}, (_layer("a"), _layer("b"))).with_fingerprints({"a": w})
    assert plan.layer("a").fingerprint == WeightFingerprint.of(w) and plan.layer("b").fingerprint is None
    plan.save(tmp_path / "p")
    back = Plan.load(tmp_path / "p")
    assert back.layer("a").fingerprint == plan.layer("a").fingerprint and back.layer("b").fingerprint is None
    fp = back.layer("a").fingerprint
    assert fp.mismatch(w) is None and fp.mismatch(w.copy()) is None
    assert "different values" in fp.mismatch(w * 1.01) and "shape" in fp.mismatch(w[:2])
    assert "dtype" in fp.mismatch(w.astype(np.float64))
    # a plan saved before fingerprints (no "fingerprint" entries) still loads
    doc = json.loads((tmp_path / "p.json").read_text())
    for rec in doc["layers"]:
        rec.pop("fingerprint", None)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    assert all(lp.fingerprint is None for lp in Plan.load(tmp_path / "p").layers)
    with pytest.raises(PlanError, match="fingerprint shape"):
        LayerPlan("x", "conv", (4, 2, 3, 3), fingerprint=WeightFingerprint.of(w[:2]))
