import numpy as np
import pytest

from cora_onnx.onnx.verify import fidelity


def test_fidelity_agreement_and_kl():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    same = fidelity(ref + 3.0, ref)  # softmax is shift-invariant
    assert same["top1_agreement"] == 100.0 and same["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    other = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    f = fidelity(other, ref)
    # image 0: KL = 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2; image 1: 0
    assert f["top1_agreement"] == 50.0 and f["images"] == 2
    assert f["kl_divergence"] == pytest.approx(0.25 * np.log(2) / 2, rel=1e-9)
