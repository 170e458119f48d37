"""The models and Imagenette images of ../shared (see ../shared/README.md) for the tools/ scripts,
loaded through the library's stages (cora_onnx.run.stages.load_model / load_data), so every script
gets the same weights, preprocessing and class map.
"""

from __future__ import annotations

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = ("resnet18", "efficientnet_lite0")


def weights_path(arch: str, shared: str | Path = SHARED) -> Path:
    """ResNet-18's ImageNet state_dict in ../shared/models; EfficientNet-Lite0's from its package."""
    if arch == "resnet18":
        return Path(shared) / "models/resnet18-imagenet.pt"
    if arch == "efficientnet_lite0":
        from cora_onnx.torch.archs.efficientnet_lite import efficientnet_lite0_weights_path

        return Path(efficientnet_lite0_weights_path())
    raise SystemExit(f"no weights known for {arch!r}; expected one of {', '.join(MODELS)}")


def data_dir(shared: str | Path = SHARED) -> Path:
    return Path(shared) / "data/imagenette"


def preprocess(arch: str, input_size: int = 224):
    """The architecture's usual preprocessing: resize to input_size, its mean/std."""
    from cora_onnx.onnx.data import Preprocess
    from cora_onnx.torch.models import default_normalization

    return Preprocess(input_size, 1.0, *default_normalization(arch))


def load(arch: str, shared: str | Path = SHARED, *, calib: bool = False, val: str | None = "dev-val"):
    """(model, preprocess, cora_onnx.run.stages.Data): the architecture with its ImageNet weights, and
    Imagenette's calibration images (calib=True) and the labelled `val` folder (None: none)."""
    from cora_onnx.run.stages import load_data, load_model

    model = load_model(arch, weights_path(arch, shared))
    pre = preprocess(arch)
    d = data_dir(shared)
    data = load_data(model, pre, calib=d / "calib" if calib else None, val=d / val if val else None,
                     class_map=d / "class_map.json")
    return model, pre, data


def sample_paths(shared: str | Path = SHARED) -> dict:
    """The folders of the many-class protocol: calibrate on Imagenette's calib, score on
    imagenet-sample/even (its class map), dev-val (its class map) as a second scoring set."""
    shared = Path(shared)
    return {"calib": shared / "data/imagenette/calib", "sample": shared / "data/imagenet-sample/even",
            "sample_map": shared / "data/imagenet-sample/class_map.json",
            "devval": shared / "data/imagenette/dev-val", "devval_map": shared / "data/imagenette/class_map.json"}


def emit(out: str | None, rec: dict, keys) -> None:
    """Print the record's `keys` as one JSON line and append the whole record to `out` (JSON lines)."""
    print(json.dumps({k: rec.get(k) for k in keys}), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
