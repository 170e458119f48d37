import numpy as np
import pytest

from cora_onnx.core.records import to_json
from cora_onnx.onnx.verify import (PARITY_LIMITS, Parity, TensorCheck, TensorDiff, compare_tensors, fidelity, is_constant,
                                   judge, output_spread, parity_failure)


def test_fidelity_agreement_and_kl():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    same = fidelity(ref + 3.0, ref)  # softmax is shift-invariant
    assert same.top1_agreement == 100.0 and same["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    other = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    f = fidelity(other, ref)
    # image 0: KL = 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2; image 1: 0
    assert f["top1_agreement"] == 50.0 and f["images"] == 2
    assert f["kl_divergence"] == pytest.approx(0.25 * np.log(2) / 2, rel=1e-9)


@pytest.mark.parametrize("kind, par, ok", [
    # weight-only: the end-to-end logit error decides; a near-tie flip (97.8% agreement) is no failure
    ("exact", {"top1_agreement": 97.8, "max_abs_error": 1e-5, "relative_max_error": 1e-6}, True),
    ("exact", {"top1_agreement": 100.0, "max_abs_error": 2e-2, "relative_max_error": 2e-3}, False),
    # integer activations with adapter branches (PyTorch at float activations): lenient, end to end
    ("float_activations", {"top1_agreement": 97.8, "max_abs_error": 0.79, "relative_max_error": 0.024}, True),
    ("float_activations", {"top1_agreement": 60.9, "max_abs_error": 68.5, "relative_max_error": 0.9}, False),
    ("float_activations", {"top1_agreement": 85.0, "max_abs_error": 1.0, "relative_max_error": 0.1}, False),
])
def test_end_to_end_limits_per_reference(kind, par, ok):
    assert (parity_failure(Parity(images=500, **par), kind) is None) == ok


def _check(first_over=None, output_error=1e-6, exact=True):
    return TensorCheck(tensors=20, images=8, worst=TensorDiff("relu_3", 0.006, 1), first_over=first_over,
                       output_error=output_error, instrumented_exact=exact)


def test_simulated_reference_is_judged_tensor_by_tensor():
    """With integer activations against the simulation, the tensor-by-tensor check decides: a correct
    model whose end-to-end agreement is low (near-tie flips, 87.5% as mobilenet_v3_large measured
    end to end) passes; a tensor off by more than one step, or float outputs off, fail."""
    near_ties = Parity(top1_agreement=87.5, max_abs_error=0.1, relative_max_error=0.17, images=500)
    assert parity_failure(near_ties, "simulated", _check()) is None
    failure = parity_failure(near_ties, "simulated", _check(first_over=TensorDiff("conv2d_4", 0.4, 9, "layer1.0")))
    assert failure is not None and "conv2d_4 (output of layer layer1.0)" in failure and "9 quantization steps" in failure
    assert "outputs" in parity_failure(near_ties, "simulated", _check(output_error=0.05))
    # instrumenting the graph changed ONNX Runtime's outputs: the check says nothing about the plain
    # session, and the end-to-end limits apply (87.5% < 90%)
    assert "agreement" in parity_failure(near_ties, "simulated", _check(exact=False))
    assert parity_failure(near_ties, "simulated") is not None


def test_compare_tensors_counts_steps_and_shares():
    rng = np.random.default_rng(0)
    ref = {f"t{i}": rng.integers(0, 256, size=(8, 16, 10, 10)).astype(np.int32) for i in range(3)}
    ort = {k: v.copy() for k, v in ref.items()}
    flat = ort["t1"].reshape(-1)
    flat[:50] += 1  # rounding at a .5 boundary: 50 of 12,800 values one step off
    out = rng.standard_normal((8, 10))
    lim = PARITY_LIMITS["simulated"]
    c = compare_tensors(ort, ref, out, out, out, lim)
    assert c.tensors == 3 and c.images == 8 and c.first_over is None and c.instrumented_exact
    assert c.worst == TensorDiff("t1", 50 / 12800, 1) and c.output_error == 0.0
    ort["t2"].reshape(-1)[7] += 2  # one value two steps off: over the limit
    c = compare_tensors(ort, ref, out, out, out, lim)
    assert c.first_over == TensorDiff("t2", 1 / 12800, 2) and c.worst == c.first_over
    ort["t0"].reshape(-1)[: 12800 // 20] -= 1  # 5% of a tensor one step off: over the share limit, and first
    c = compare_tensors(ort, ref, out, out + 1e-3, out * 1.01, lim)
    assert c.first_over.tensor == "t0" and c.first_over.mismatch == pytest.approx(0.05)
    assert c.output_error > 1e-4 and not c.instrumented_exact
    assert to_json(c)["first_over"] == {"tensor": "t0", "mismatch": pytest.approx(0.05), "max_steps": 1}
    assert set(to_json(c)) == {"tensors", "images", "worst", "first_over", "output_relative_error",
                               "instrumented_exact"}


def test_output_spread_finds_constant_outputs():
    rng = np.random.default_rng(0)
    assert output_spread(np.zeros((5, 10))) == 0.0 and is_constant(0.0)
    same = np.tile(rng.standard_normal(10), (5, 1))
    assert is_constant(output_spread(same))
    assert not is_constant(output_spread(same + 1e-3 * rng.standard_normal((5, 10))))
    assert output_spread(same[:1]) is None and not is_constant(None)  # one image: cannot tell
    same_par = Parity(max_abs_error=0.0, relative_max_error=0.0, top1_agreement=100.0, images=5)
    v = judge(same_par, "exact", np.zeros((5, 10)), float_logits=np.zeros((5, 10)))
    assert v.constant_output and not v.verified
    assert "do not depend on its input" in v.failure and "so does the float model" in v.failure
    assert v.parity.output_spread == 0.0 and v.parity["reference"] == "exact"
    v = judge(same_par, "exact", rng.standard_normal((5, 10)))
    assert v.verified and not v.constant_output and v.parity["limits"]["relative_error"] == 1e-3
