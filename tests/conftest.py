from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The embedded default, built once per test session in a temporary cache."""
    from cora_onnx.torch.embedded import digits_default

    return digits_default(tmp_path_factory.mktemp("cache"))


class TinyNet(torch.nn.Module):
    """Conv+BN, a depthwise conv, a 1x1 conv and a classifier: every kind of layer we plan."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.2, 0.2)
    return m.eval()
