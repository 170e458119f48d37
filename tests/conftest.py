from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The embedded default, built once per test session in a temporary cache."""
    from cora_onnx.torch.embedded import digits_default

    return digits_default(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny():
    """TinyNet (tests/tinynet.py) with seeded weights and BatchNorm statistics."""
    import torch  # here, not at import: the pass tests (tests/passes) run with torch absent
    from tinynet import TinyNet

    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.2, 0.2)
    return m.eval()
