"""The per-layer harm table (cora_onnx.torch.search.harm): from cached stage inputs, the same KL as a
forward pass from the image for every candidate."""

import pytest
import torch
import torchvision
from torch import nn

from cora_onnx.torch.quantizers import QuantSpec, fake_quantize, quantizable_layers
from cora_onnx.torch.search.harm import layer_harm


def _live(m: nn.Module, var: tuple[float, float]) -> nn.Module:
    """Random BatchNorm statistics, so that logits are neither ~0 nor one-hot and every layer matters."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(*var)
    return m.eval()


def _resnet():
    torch.manual_seed(0)
    return _live(torchvision.models.resnet18(num_classes=10), (0.5, 2.0))


def _staged_equals_full(model, names, images):
    layers = quantizable_layers(model)
    cands = {n: {b: fake_quantize(layers[n].weight.detach(), QuantSpec(bits=b)) for b in (2, 4)} for n in names}
    staged = layer_harm(model, layers, cands, images, batch=3)
    full = layer_harm(model, layers, cands, images, batch=3, staged=False)
    assert list(staged) == names  # in the order asked for, whatever the stage order
    for n in names:
        for b in (2, 4):
            assert staged[n][b] == pytest.approx(full[n][b], rel=1e-4, abs=1e-9)
        assert staged[n][2] > staged[n][4] > 0
    for n, m in layers.items():  # every weight is back
        assert torch.equal(m.weight, dict(model.named_modules())[n].weight)
    return staged


def test_resnet_harm_from_stage_inputs_is_the_full_forward_harm():
    model = _resnet()
    names = ["layer4.1.conv2", "conv1", "layer2.0.downsample.0", "layer1.0.conv2", "fc"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    _staged_equals_full(model, names, torch.randn(5, 3, 40, 40))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_model_with_a_features_prefix_and_an_unstaged_model():
    torch.manual_seed(1)
    model = _live(torchvision.models.mobilenet_v2(num_classes=10), (0.01, 0.05))
    _staged_equals_full(model, ["features.2.conv.0.0", "features.17.conv.2", "classifier.1"],
                        torch.randn(4, 3, 32, 32))

    class Branchy(nn.Module):  # no known stages: a full forward per candidate
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc((self.a(x).relu() + self.b(x)).mean((2, 3)))

    _staged_equals_full(Branchy().eval(), ["b", "a"], torch.randn(6, 3, 8, 8))
