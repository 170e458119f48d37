"""A network as a chain of stages, and the inputs of its layers served from cached stage inputs.

A layer-by-layer search (product quantization, GPTQ-rounded uniform layers) measures each
layer's inputs on the network whose earlier layers are already quantized. With a forward pass
from the image for every layer, the statistics of a late layer cost a pass through almost the
whole network for each of its images (twice with the float network's target), and the passes,
not the fits, dominate the search: EfficientNet-Lite0's late 1x1 convs take about a minute each
on 750 images. When the model's forward is a chain x -> s_n(...s_1(x)) of stages (blocks), the
input of stage s on every statistics image is kept in memory; a layer's input is then one stage
away, and the cache moves one stage on once every layer of the stage is final.

Stages come from `model.cora_stages()` (a method returning [(callable, modules), ...]; our
EfficientNet-Lite0 has one), a torchvision ResNet's stem / blocks / head, the children of an
nn.Sequential, or those of a model's first child when it is a Sequential (`features`) followed
by the rest of the forward. They are checked against the model's own forward on real images before use; a
model without stages, or whose stages do not reproduce its forward, is served by full passes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cora_onnx.core.errors import ModelError
from cora_onnx.torch.search.stats import channel_sums

__all__ = ["Stage", "model_stages", "check_stages", "checked_stages", "stage_index", "LayerFeed"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30  # both networks' cached stage inputs together (at most a quarter of the RAM)


def _cache_budget() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return DEFAULT_CACHE_BYTES
    return min(DEFAULT_CACHE_BYTES, ram // 4)


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class Stage:
    """One link of the chain: run(x) -> the next stage's input; modules: those it calls (the
    layers inside them are this stage's)."""

    run: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[nn.Module, ...]


def _seq(*mods: nn.Module) -> Stage:
    def run(x):
        for m in mods:
            x = m(x)
        return x
    return Stage(run, tuple(mods))


def _resnet_stages(model: nn.Module) -> list[Stage]:
    stages = [_seq(model.conv1, model.bn1, model.relu, model.maxpool)]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        stages += [_seq(block) for block in layer]
    flat = nn.Flatten(1)
    stages.append(_seq(model.avgpool, flat, model.fc))
    return stages


def _prefix_stages(model: nn.Module) -> list[Stage] | None:
    """Models whose forward starts with a Sequential child (torchvision's VGG, MobileNet,
    EfficientNet, ConvNeXt, DenseNet: `features`): its children, then the rest of the forward,
    run as the model's own forward with that child swapped for an identity (check_stages then
    tells whether the forward really starts there)."""
    first = next(iter(model.named_children()), None)
    if first is None or not isinstance(first[1], nn.Sequential) or len(first[1]) < 2:
        return None
    name, prefix = first
    rest = tuple(m for n, m in model.named_children() if n != name)

    def tail(x):
        setattr(model, name, nn.Identity())
        try:
            return model(x)
        finally:
            setattr(model, name, prefix)
    return [_seq(m) for m in prefix] + [Stage(tail, rest)]


def model_stages(model: nn.Module) -> list[Stage] | None:
    """The model's forward as a chain of stages, or None when it is not known to be one."""
    own = getattr(model, "cora_stages", None)
    if callable(own):
        return [s if isinstance(s, Stage) else Stage(*s) for s in own()]
    try:
        from torchvision.models import ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        ResNet = ()
    if isinstance(model, ResNet):
        return _resnet_stages(model)
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return [_seq(m) for m in model]
    return _prefix_stages(model)


@torch.no_grad()
def check_stages(model: nn.Module, stages: Sequence[Stage], x: torch.Tensor) -> bool:
    """Whether the chain of stages gives the model's output on the batch x (float rounding aside)."""
    ref = model(x)
    out = x
    try:
        for s in stages:
            out = s.run(out)
    except Exception as exc:  # a chain that is not the forward may fail anywhere (shapes, types)
        log.debug("the stages do not run: %s", exc)
        return False
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return False
    return bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp_min(1e-30))))


def stage_index(stages: Sequence[Stage], layers: dict[str, nn.Module]) -> dict[str, int | None]:
    """The stage each layer runs in (None: in no stage's modules)."""
    where = {id(m): i for i, s in enumerate(stages) for top in s.modules for m in top.modules()}
    return {n: where.get(id(m)) for n, m in layers.items()}


def checked_stages(model: nn.Module, x: torch.Tensor) -> list[Stage] | None:
    """model_stages(model) when they reproduce its forward on the batch x, else None."""
    stages = model_stages(model)
    if stages is None or not check_stages(model, stages, x):
        return None
    return stages


def layer_input(run: Callable[[torch.Tensor], object], mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`mod`'s input when run(x) is called (the call stops right there), or None if it never is."""
    seen = []

    def hook(_mod, inputs):
        seen.append(inputs[0].detach().float())
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


class _Cache:
    """One network's input to one stage for a fixed image set, as one (N, ...) tensor."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages, self.stage, self.data, self.indices = stages, -1, None, None

    def drop(self) -> None:
        self.stage, self.data, self.indices = -1, None, None

    @torch.no_grad()
    def move_to(self, stage: int, images, indices: np.ndarray, batch_size: int) -> None:
        """Hold stage `stage`'s input for the images `indices` (of the full set `images`): from the
        images when there is nothing usable yet, else by running the stages in between."""
        fresh = self.data is None or self.stage > stage or not np.isin(indices, self.indices).all()
        start = 0 if fresh else self.stage
        if not fresh and start == stage and len(indices) == len(self.indices):
            return
        src = None if fresh else self.data[torch.from_numpy(np.searchsorted(self.indices, indices))] \
            if len(indices) != len(self.indices) else self.data
        self.data = None  # the old cache goes as soon as its rows are taken
        out = None
        for a in range(0, len(indices), batch_size):
            if fresh:
                x = images.take(indices[a:a + batch_size])
            else:
                x = src[a:a + batch_size]
            for s in self.stages[start:stage]:
                x = s.run(x)
            if out is None:
                out = torch.empty((len(indices), *x.shape[1:]), dtype=x.dtype)
            out[a:a + x.shape[0]] = x
        self.data, self.stage, self.indices = out, stage, indices


class LayerFeed:
    """Inputs of the layers of the student (the network being quantized, layer after layer in
    `order`) and of the teacher (the float network) on the statistics images of each layer
    (`images.subset(sizes[name], seed)`), in batches of `batch_size`.

    With stages (see the module doc) both networks' inputs to the current stage are cached for the
    images of every layer still to come, when they take at most `cache_bytes` for the two (a move
    to the next stage holds both stages' inputs for a moment); a stage whose inputs would not fit,
    and a model without stages, is served by full passes from the image. Layers must
    be asked for in `order`, each after the ones before it are final."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: dict[str, nn.Module], order: list[str],
                 sizes: dict[str, int], images, seed: int, batch_size: int,
                 cache_bytes: int | None = None) -> None:
        self.teacher, self.student, self.images, self.seed, self.bs = teacher, student, images, seed, batch_size
        self.sizes = sizes
        self.cache_bytes = _cache_budget() if cache_bytes is None else cache_bytes
        self.stage_of: dict[str, int] = {}
        self.caches: dict[str, _Cache] = {}
        tst, sst = model_stages(teacher), model_stages(student)
        if tst is None or sst is None or len(tst) != len(sst):
            log.info("statistics: full forward passes per layer (the model is not a known chain of stages)")
            return
        x = next(images.subset(2, seed).batches(2))
        if not (check_stages(teacher, tst, x) and check_stages(student, sst, x)):
            log.warning("statistics: the model's stages do not reproduce its forward; using full forward passes")
            return
        stage_of = stage_index(sst, {n: layers[n] for n in order})
        ranks = [stage_of[n] for n in order]
        if any(r is None for r in ranks) or ranks != sorted(ranks):
            log.info("statistics: layers are not in stage order; using full forward passes")
            return
        self.stage_of = stage_of
        self.caches = {"teacher": _Cache(tst), "student": _Cache(sst)}
        self.order = order
        self.per_image = self._stage_input_bytes(sst, x[:1])
        log.info("statistics: %d stages, stage inputs cached (at most %.1f GiB)", len(sst), self.cache_bytes / 2 ** 30)

    @staticmethod
    @torch.no_grad()
    def _stage_input_bytes(stages: list[Stage], x: torch.Tensor) -> list[int]:
        out = []
        for s in stages:
            out.append(x.numel() * 4)
            x = s.run(x)
        return out

    def _indices(self, n: int) -> np.ndarray:
        return np.asarray(self.images.subset_indices(n, self.seed))

    def _cached(self, name: str) -> int | None:
        """The stage whose inputs serve `name`, with both caches moved there; None: full passes."""
        stage = self.stage_of.get(name)
        if stage is None:
            return None
        pos = self.order.index(name)
        n = max(self.sizes[m] for m in self.order[pos:])  # every image still to be asked for
        if 2 * n * self.per_image[stage] > self.cache_bytes:
            for c in self.caches.values():
                c.drop()
            return None
        idx = self._indices(n)
        for c in self.caches.values():
            c.move_to(stage, self.images, idx, self.bs)
        return stage

    def _batches(self, net: str, name: str, mod: nn.Module, stage: int | None) -> Iterator[torch.Tensor]:
        n = self.sizes[name]
        if stage is None:
            model = self.teacher if net == "teacher" else self.student
            for x in self.images.subset(n, self.seed).batches(self.bs):
                yield _required(layer_input(model, mod, x), name)
            return
        cache = self.caches[net]
        rows = torch.from_numpy(np.searchsorted(cache.indices, self._indices(n)))
        run = cache.stages[stage].run
        for a in range(0, len(rows), self.bs):
            yield _required(layer_input(run, mod, cache.data[rows[a:a + self.bs]]), name)

    @property
    def staged(self) -> bool:
        """Whether stage inputs can be cached (else every layer is served by full passes)."""
        return bool(self.stage_of)

    @torch.no_grad()
    def teacher_output_mean(self, name: str, tmod: nn.Module) -> torch.Tensor:
        """Per-output-channel mean of the teacher layer's output on the layer's statistics images."""
        total, count = 0, 0
        for x in self._batches("teacher", name, tmod, self._cached(name)):
            s, n = channel_sums(tmod(x), tmod)
            total, count = total + s, count + n
        return (total / count).float()

    def student_inputs(self, name: str, mod: nn.Module) -> Iterator[torch.Tensor]:
        """Batches of the student layer `mod`'s (named `name`) input on its statistics images."""
        return self._batches("student", name, mod, self._cached(name))

    def pairs(self, name: str, tmod: nn.Module, smod: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (student input, teacher input) of the layer on its statistics images."""
        stage = self._cached(name)
        return zip(self._batches("student", name, smod, stage), self._batches("teacher", name, tmod, stage))


def _required(x: torch.Tensor | None, name: str) -> torch.Tensor:
    if x is None:
        raise ModelError(f"{name} was never called by the model's forward")
    return x
