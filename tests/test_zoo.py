"""Every torchvision ConvNet family through `cora_onnx.quantize` (issue 25), one small member of
each at a small input size: random weights with BatchNorm statistics measured on real calibration
images (cora_onnx.torch.models.measure_batchnorm), 4-bit weights with 8-bit integer activations
(one run covers the weight mapping and the activation layout), verified against PyTorch in ONNX
Runtime. The whole zoo at full size, with CoRa and PQ too, is tools/zoo.py (docs/results/zoo.md),
not a test.

Also here: the cases behind the zoo's failures, on tiny modules: an auxiliary head that does not
run in eval mode leaves the plan, a Linear inside a channels-last block (exported as a MatMul with
its weight transposed) is mapped, its corrected bias goes into its own Add when the exporter shares
the bias initializer, and a layer whose weight the exporter rewrote, or which the passes cannot
write (a tied weight), is refused before any search."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import cora_onnx
from cora_onnx.core.errors import ModelError, ParityError
from cora_onnx.onnx.data import Preprocess, load_images
from cora_onnx.torch.export import NotRun, drop_unused_modules, fuse_batchnorm, quantizable_layers
from cora_onnx.torch.models import measure_batchnorm
from realdata import SHARED, require_shared

SIZE = 64
IMAGES = 8


def _small_head(model: nn.Module, features: int) -> nn.Module:
    """VGG / AlexNet with their classifier's shape (Linear-ReLU-Dropout twice, then Linear) but
    64 hidden units instead of 4096, so the test does not export 100M parameters."""
    model.classifier = nn.Sequential(nn.Linear(features, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 100))
    return model


def _family(name: str) -> nn.Module:
    import torchvision.models as tvm
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.densenet import DenseNet
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig
    from torchvision.models.regnet import BlockParams, RegNet
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.models.vgg import VGG, make_layers

    builders = {
        "resnet": lambda: tvm.resnet18(num_classes=100),
        "resnext": lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, num_classes=100),
        "wide_resnet": lambda: ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=100),
        "densenet": lambda: DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                                     num_classes=100),
        "inception": lambda: tvm.inception_v3(num_classes=100, aux_logits=True, init_weights=True),
        "googlenet": lambda: tvm.googlenet(num_classes=100, aux_logits=True, init_weights=True),
        "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=100, width_mult=0.5),
        "mobilenet_v3": lambda: tvm.mobilenet_v3_small(num_classes=100),
        "efficientnet": lambda: EfficientNet([MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(6, 5, 2, 16, 24, 2),
                                              MBConvConfig(6, 3, 2, 24, 40, 1)], dropout=0.2, num_classes=100),
        "efficientnet_v2": lambda: EfficientNet([FusedMBConvConfig(1, 3, 1, 16, 16, 1),
                                                 FusedMBConvConfig(4, 3, 2, 16, 32, 2),
                                                 MBConvConfig(4, 3, 2, 32, 48, 1)], dropout=0.2, num_classes=100,
                                                last_channel=128),
        "regnet_x": lambda: RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8),
                                   num_classes=100),
        "regnet_y": lambda: RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                                                se_ratio=0.25), num_classes=100),
        "convnext": lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                                     num_classes=100),
        "shufflenet": lambda: tvm.shufflenet_v2_x0_5(num_classes=100),
        "squeezenet": lambda: tvm.squeezenet1_1(num_classes=100),
        "mnasnet": lambda: tvm.mnasnet0_5(num_classes=100),
        "vgg": lambda: _small_head(VGG(make_layers([16, "M", 32, "M", 32, "M"], batch_norm=True)), 32 * 7 * 7),
        "alexnet": lambda: _small_head(tvm.alexnet(), 256 * 6 * 6),
    }
    torch.manual_seed(0)
    return builders[name]()


# every family's small member (tools/zoo.py covers every family at full size)
FAMILIES = ["resnet", "resnext", "wide_resnet", "densenet", "inception", "googlenet", "mobilenet_v2", "mobilenet_v3",
            "efficientnet", "efficientnet_v2", "regnet_x", "regnet_y", "convnext", "shufflenet", "squeezenet", "mnasnet",
            "vgg", "alexnet"]
SIZES = {"inception": 96}  # inception_v3 needs at least 75 px


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """IMAGES calibration images of ../shared, as links in a flat folder."""
    require_shared()
    src = sorted((SHARED / "data/imagenette/calib").glob("*/*"))
    out = tmp_path_factory.mktemp("calib")
    for p in random.Random(0).sample(src, IMAGES):
        (out / f"{p.parent.name}_{p.name}").symlink_to(p)
    return out


def _measured(name: str, calib: Path, size: int) -> nn.Module:
    model = _family(name)
    images = load_images(calib, Preprocess(input_size=size))
    return measure_batchnorm(model, (torch.from_numpy(b) for b in images.batches(8)))


# Conv/Gemm/MatMul nodes that ONNX Runtime still runs as float kernels with --act-bits 8: in
# DenseNet, the BatchNormalization after each transition's AveragePool, which ONNX Runtime rewrites
# as an NCHWc Conv (docs/results/int8.md#densenet); every Conv of the model is an integer kernel
FLOAT_LEFT: dict[str, int] = {"densenet": 3}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_w4_a8(name, calib_dir, tmp_path):
    """4-bit weights (every Conv/Linear mapped to the exported graph) and 8-bit integer activations:
    verified, and every Conv/Gemm/MatMul an integer kernel in ONNX Runtime. A refusal by the parity
    gate on near-ties of integer activations (issue 25 item 4, worked on separately) is an expected
    failure here; any other error fails."""
    size = SIZES.get(name, SIZE)
    model = _measured(name, calib_dir, size)
    with torch.no_grad():
        logits = model(torch.from_numpy(next(load_images(calib_dir, Preprocess(size)).batches(4))))
    assert logits.std() > 1e-3  # BatchNorm statistics measured: logits of normal size, not ~1e-9
    report_path = tmp_path / "r.json"
    running = copy.deepcopy(model)
    drop_unused_modules(running, size)
    layers = set(quantizable_layers(running))
    try:
        result = cora_onnx.quantize(model, calib=calib_dir, bits=4, act_bits=8, out=tmp_path / "m.onnx",
                                    report=report_path, input_size=size, latency_runs=0, parity_images=IMAGES,
                                    threads=1)
    except ParityError as exc:
        report = json.loads(report_path.read_text())
        kernels = report["activations"]["onnxruntime_kernels"]
        assert kernels["float_compute"] <= FLOAT_LEFT.get(name, 0), kernels
        pytest.xfail(f"parity gate with integer activations (issue 25 item 4): {str(exc)[:200]}")
    report = result.report
    assert report["verified"] is True
    assert {lp.name for lp in result.plan.layers} == layers  # every layer planned and mapped
    kernels = report["activations"]["onnxruntime_kernels"]
    assert kernels["integer"] > 0
    assert kernels["float_compute"] <= FLOAT_LEFT.get(name, 0), kernels


class AuxNet(nn.Module):
    """A classifier with an auxiliary head that runs only in training (as inception_v3's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        out = self.fc(x.mean(dim=(2, 3)))
        if self.training:
            return out, self.aux(x)
        return out


class BlockMLP(nn.Module):
    """A ConvNeXt-like block: the Linear layers run on a channels-last 4-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x)
        x = x + self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean(dim=(2, 3)))


class SharedBias(nn.Module):
    """BlockMLP with equal (zero) biases in its block, which the exporter stores as one initializer
    read by both Adds (random-weight ConvNeXt's block Linears), and a conv that takes an adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        for m in (self.block[0], self.block[2]):
            nn.init.zeros_(m.bias)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv(x)))
        x = x + self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean(dim=(2, 3)))


class ChannelSplit(nn.Module):
    """ShuffleNet's channel split: torch.chunk, one ONNX Split node with two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a, b = torch.relu(self.conv(x)).chunk(2, dim=1)
        return self.fc(torch.cat((a, torch.relu(self.branch(b))), 1).mean(dim=(2, 3)))


def test_channel_split_with_integer_activations(tmp_path):
    """The simulation of integer activations finds the Split's outputs (getitem nodes of one
    aten.split), so ShuffleNet's A8 file is checked instead of refused."""
    torch.manual_seed(0)
    result = cora_onnx.quantize(ChannelSplit().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx",
                                input_size=16, latency_runs=0, threads=1, act_bits=8)
    assert result.report["verified"] is True


class ScaledLinear(nn.Linear):
    """A Linear whose forward scales its weight: the exporter folds the product into a new constant,
    so the weight the plan is made from is nowhere in the graph."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight * 2.0, self.bias)


class Rewritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = ScaledLinear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _images(tmp_path: Path, n: int = 8) -> Path:
    from PIL import Image
    import numpy as np

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_aux_head_leaves_the_plan(tmp_path):
    torch.manual_seed(0)
    model = AuxNet()
    model.train()(torch.randn(2, 3, 16, 16))  # materializes the lazy layer, as training would
    model.eval()
    fused = fuse_batchnorm(model, 16)
    assert isinstance(fused.aux, NotRun)
    assert set(quantizable_layers(fused)) == {"conv", "fc"}
    result = cora_onnx.quantize(model, calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                                latency_runs=0, threads=1)
    assert result.report["verified"] is True
    assert {lp.name for lp in result.plan.layers} == {"conv", "fc"}


@pytest.mark.parametrize("act_bits", [None, 8])
def test_linear_inside_a_block_is_mapped(tmp_path, act_bits):
    torch.manual_seed(0)
    model = BlockMLP().eval()
    result = cora_onnx.quantize(model, calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                                latency_runs=0, threads=1, act_bits=act_bits)
    assert result.report["verified"] is True
    assert {"block.0", "block.2"} <= {lp.name for lp in result.plan.layers}
    import onnx

    names = {i.name for i in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert {"block.0.weight_quantized", "block.2.weight_quantized"} <= names


def test_linear_inside_a_block_takes_its_codebook(tmp_path):
    """PQ on a Linear the exporter writes as Transpose + MatMul + Add: the decoded weight feeds the
    Transpose and the corrected bias replaces the Add's initializer (ConvNeXt's block Linears)."""
    torch.manual_seed(0)
    result = cora_onnx.quantize(BlockMLP().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                                latency_runs=0, threads=1, method="pq", em_iters=2, finetune_steps=0, codewords=4)
    assert result.report["verified"] is True
    import onnx

    names = {i.name for i in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert {"block.0.weight_codes", "block.2.weight_codes"} <= names


def test_unmappable_layer_is_refused_before_the_search(tmp_path, monkeypatch):
    from cora_onnx.torch import search

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran")

    monkeypatch.setitem(search.METHODS, "rtn", search.Method("rtn", search.RtnSettings, no_search, False))
    torch.manual_seed(0)
    with pytest.raises(ModelError, match=r"not found in the exported ONNX graph \(e\.g\. fc:.*--skip fc"):
        cora_onnx.quantize(Rewritten().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                           latency_runs=0, threads=1)
    assert not (tmp_path / "m.onnx").exists()


def test_a_bias_shared_among_layers_takes_its_corrected_values(tmp_path):
    """CoRa corrects every bias once it fine-tunes an adapter; the block's equal biases are one
    initializer in the exported graph (random ConvNeXt's zero biases, read by 22 Adds): each Linear's
    corrected bias goes into its own Add (BiasUpdatePass), and the file verifies."""
    torch.manual_seed(0)
    result = cora_onnx.quantize(SharedBias().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                                latency_runs=0, threads=1, method="cora", budget=0.5, iters=4, calib_size=8,
                                stats_size=8, sens_images=4)
    assert result.report["verified"] is True
    assert all(result.plan.layer(n).bias is not None for n in ("block.0", "block.2"))
    import onnx

    names = {i.name for i in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert {"block.0.bias_corrected", "block.2.bias"} <= names


class Tied(nn.Module):
    """Two Linear layers sharing one weight: one initializer in the exported graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_tied_weights_are_refused_before_the_search(tmp_path, monkeypatch):
    """Both layers of a tied weight are found in the graph (map_layers: fc2's under fc1's name), but
    the passes cannot write two plans into one initializer: without the rehearsal this failed after
    the search ("no initializer named fc1.weight"); with it, before: one line naming the layer found
    by bisection and the pass's message, no file."""
    from cora_onnx.torch import search

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran")

    monkeypatch.setitem(search.METHODS, "rtn", dataclasses.replace(search.METHODS["rtn"], run=no_search))
    torch.manual_seed(0)
    with pytest.raises(ModelError, match=r"^the ONNX passes cannot write what method rtn may plan for layer fc2 \(a "
                                         r"4-bit grid; rehearsed before the search\): plan does not fit the ONNX model: "
                                         r"no initializer named fc1\.weight; leave it in float with --skip fc2$"):
        cora_onnx.quantize(Tied().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                           latency_runs=0, threads=1)
    assert not (tmp_path / "m.onnx").exists()


def test_unmappable_layer_left_in_float_with_skip(tmp_path):
    torch.manual_seed(0)
    result = cora_onnx.quantize(Rewritten().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=16,
                                latency_runs=0, threads=1, skip="fc")
    assert result.report["verified"] is True
    assert [lp.name for lp in result.plan.layers] == ["conv"]


def test_linear_inside_a_block_takes_a_size_target(tmp_path):
    """A size target on Linear layers that run on channels-last 4-D tensors (ConvNeXt's blocks):
    their output means are taken over the last axis (channel_sums), so the fit's corrected biases
    have the layer's width, and the file verifies within its target."""
    torch.manual_seed(0)
    result = cora_onnx.quantize(BlockMLP().eval(), calib=_images(tmp_path), out=tmp_path / "m.onnx", input_size=12,
                                latency_runs=0, threads=1, target_ratio=1.5, em_iters=2, menu_em_iters=1,
                                finetune_steps=2)
    r = result.report
    assert r["verified"] is True and r["size_target"]["within"]
    assert all(lp.bias is None or lp.bias.values.shape == (lp.shape[0],) for lp in result.plan.layers)
