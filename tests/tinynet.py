"""TinyNet, the small torch model of the pipeline tests (the `tiny` fixture of tests/conftest.py).
A module of its own so that conftest imports torch only when a test asks for it: the pass tests
(tests/passes) run with torch absent."""

import torch


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
