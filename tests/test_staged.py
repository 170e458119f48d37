"""cora_onnx.torch.search.staged: a model's forward as a chain of stages, and layer inputs served from
cached stage inputs (the layer-by-layer PQ search's statistics)."""

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.torch.export import apply_plan_torch, fuse_batchnorm
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.torch.search import PqSettings, search_pq
from cora_onnx.torch.search.pq.statistics import Geom, joint_stats, input_stats
from cora_onnx.torch.search.staged import LayerFeed, check_stages, model_stages
from cora_onnx.torch.images import as_torch


def _images(n=30, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return as_torch(ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(),
                             None, tuple(map(str, range(n))), Preprocess(input_size=size)))


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 12, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, 5)).eval()


class _Staged(nn.Module):
    """A non-Sequential model declaring its stages; `wrong` declares a chain that skips the ReLU."""

    def __init__(self, wrong=False):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Linear(6, 4)
        self.wrong = wrong

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))

    def cora_stages(self):
        first = (lambda x: self.a(x)) if self.wrong else (lambda x: torch.relu(self.a(x)))
        return [(first, (self.a,)), (self.b, (self.b,)), (lambda x: self.fc(x.mean((2, 3))), (self.fc,))]


class _NotFirst(nn.Module):
    """A Sequential first child that the forward does not call first: not a chain from it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.pre = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(self.pre(x)).mean((2, 3)))


def _model(name):
    from torchvision.models import mobilenet_v3_small, resnet18

    from cora_onnx.torch.archs.efficientnet_lite import efficientnet_lite0

    torch.manual_seed(0)
    build = {"sequential": _sequential, "declared": lambda: _Staged().eval(),
             "resnet18": lambda: fuse_batchnorm(resnet18(num_classes=7).eval(), input_size=32),
             "efficientnet_lite0": lambda: fuse_batchnorm(efficientnet_lite0(num_classes=7, image_size=32).eval(), 32),
             "mobilenet_v3_small": lambda: fuse_batchnorm(mobilenet_v3_small(num_classes=7).eval(), input_size=32)}
    return build[name]()


@pytest.mark.parametrize("name", ["sequential", "declared", "resnet18", "efficientnet_lite0", "mobilenet_v3_small"])
def test_stages_reproduce_the_forward(name):
    model = _model(name)
    stages = model_stages(model)
    assert stages is not None
    x = next(_images(4, 32).batches(4))
    assert check_stages(model, stages, x)


def test_stages_that_do_not_reproduce_the_forward_are_caught_and_not_used(caplog):
    model = _Staged(wrong=True).eval()
    x = next(_images(4).batches(4))
    assert not check_stages(model, model_stages(model), x)
    layers = quantizable_layers(model)
    logger = logging.getLogger("cora_onnx.torch.search.staged")
    logger.addHandler(caplog.handler)  # the CLI's tests stop cora_onnx's records at its own logger
    try:
        with caplog.at_level(logging.WARNING, logger="cora_onnx.torch.search.staged"):
            feed = LayerFeed(model, copy.deepcopy(model), layers, list(layers), {n: 8 for n in layers}, _images(),
                             0, 4)
    finally:
        logger.removeHandler(caplog.handler)
    assert "do not reproduce" in caplog.text and not feed.stage_of
    assert model_stages(nn.Module()) is None
    other = _NotFirst().eval()  # stages proposed from its first child, refused by the check
    assert model_stages(other) is not None and not check_stages(other, model_stages(other), x)
    assert other.features is not None and isinstance(other.features, nn.Sequential)  # restored after the tail ran


def _quantize_in_place(mod):
    with torch.no_grad():  # any change of the weight; the later layers' inputs must see it
        mod.weight.copy_(torch.round(mod.weight * 64) / 64)


@pytest.mark.parametrize("name", ["sequential", "resnet18", "efficientnet_lite0", "mobilenet_v3_small"])
@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_fed_statistics_equal_full_passes_as_the_student_changes(name, cache_bytes):
    """Layer after layer, as the search goes: each layer's joint and student statistics from the feed
    (cached stage inputs; cache_bytes 0: full passes) equal those of full passes from the image on
    the student as it is then, with different image counts per layer (nested subsets)."""
    teacher = _model(name)
    student = copy.deepcopy(teacher)
    tl, sl = quantizable_layers(teacher), quantizable_layers(student)
    order = list(sl)
    size = 32
    images = _images(30, size)
    sizes = {n: (8, 30, 12, 20)[i % 4] for i, n in enumerate(order)}
    feed = LayerFeed(teacher, student, sl, order, sizes, images, 3, 7, cache_bytes=cache_bytes)
    assert feed.stage_of
    for n in order:
        mod = sl[n]
        if getattr(mod, "groups", 1) != 1 or mod.weight[0].numel() > 600:  # K x K moments of K = 4,608: slow
            _quantize_in_place(mod)
            continue
        g = Geom(n, "x", mod.weight[0].numel(), 1, 1)
        sub = images.subset(sizes[n], 3)
        ref = joint_stats(teacher, tl[n], student, mod, g, sub, 5)  # second moments: centered ones cancel
        got = joint_stats(teacher, tl[n], student, mod, g, None, 5, pairs=feed.pairs(n, tl[n], mod))
        for k in ("qq", "qf", "ff", "mu_q", "mu_f"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5 * float(ref[k].abs().max()),
                                       msg=lambda m: f"{n} {k}: {m}")  # batches differ: float rounding
        H, mu = input_stats(student, mod, g, sub, 5)
        H2, mu2 = input_stats(student, mod, g, None, 5, inputs=feed.student_inputs(n, mod))
        torch.testing.assert_close(H2, H, rtol=1e-4, atol=1e-5 * float(H.abs().max()))
        torch.testing.assert_close(mu2, mu, rtol=1e-4, atol=1e-5 * float(mu.abs().max()))
        _quantize_in_place(mod)
    assert all((c.data is None) == (cache_bytes == 0) for c in feed.caches.values())


def test_layers_out_of_stage_order_are_served_by_full_passes():
    model = _sequential()
    layers = quantizable_layers(model)
    order = list(layers)[::-1]
    feed = LayerFeed(model, copy.deepcopy(model), layers, order, {n: 8 for n in layers}, _images(), 0, 4)
    assert not feed.stage_of


@pytest.mark.parametrize("name", ["sequential", "declared"])
@pytest.mark.parametrize("without", ["cache", "stages"])
def test_pq_search_gives_the_same_plan_with_and_without_the_cache(monkeypatch, name, without):
    """without the cache (cache_bytes 0: the staged path's per-layer passes) or without stages at
    all (full passes, the float output means of weight-target layers in one pass up front)."""
    import cora_onnx.torch.search.staged as staged

    model = _model(name)
    calib = _images(24, 16)
    settings = PqSettings(blocks="small", codewords=8, em_iters=3, finetune_steps=0, stats_size=8, stats_patches=4,
                          uniform_layers="2:4" if name == "sequential" else "b:4", uniform_rounding="gptq",
                          calib_size=24, target="float",
                          weight_target_layers=("8",) if name == "sequential" else ("fc",))
    cached = search_pq(model, settings, calib)
    if without == "cache":
        monkeypatch.setattr(staged, "DEFAULT_CACHE_BYTES", 0)
    else:
        monkeypatch.setattr(staged, "model_stages", lambda model: None)
    plain = search_pq(model, settings, calib)
    assert [lp.name for lp in cached.layers] == [lp.name for lp in plain.layers]
    x = next(calib.batches(24))
    torch.testing.assert_close(apply_plan_torch(model, cached)(x), apply_plan_torch(model, plain)(x),
                               rtol=1e-4, atol=1e-4)
    blocks = {lp.name: lp.codebook.block_size for lp in cached.layers if lp.codebook is not None}
    assert blocks and (name != "declared" or blocks["fc"] == 2)  # 6 inputs: the largest block that divides
    for la, lb in zip(cached.layers, plain.layers):
        if la.codebook is not None:
            assert np.array_equal(la.codebook.codes, lb.codebook.codes), la.name
