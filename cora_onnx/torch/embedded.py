"""The embedded default model: a small ConvNet trained on scikit-learn's digits.

``cora-onnx`` must run on a fresh machine without downloading anything. The
"embedded default" is built from data that an installed package already ships:
``sklearn.datasets.load_digits`` (1,797 8x8 greyscale images, values 0..16).
On first use :func:`digits_default`

1. splits the digits deterministically (stratified, 75 % / 25 %),
2. writes the splits as 8x8 RGB PNG files into ``calib/<digit>/NNNN.png`` and
   ``val/<digit>/NNNN.png`` (``NNNN`` is the index in ``load_digits``),
3. trains :class:`~cora_onnx.torch.archs.digits.DigitsCNN` deterministically on
   tensors read back from exactly those PNG files, with the same preprocessing
   the pipeline uses (RGB uint8 -> ``/255`` -> normalise with mean/std),
4. saves the ``state_dict`` to ``digits_cnn.pt`` and a ``meta.json``.

Everything is built in a temporary sibling folder and moved into place with
:func:`os.replace`, so an interrupted build never leaves a half-built cache.
Later calls reuse the cached folder without retraining.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cora_onnx.torch.archs.digits import digits_cnn

__all__ = ["EmbeddedDefault", "default_cache_root", "digits_default"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the on-disk layout; bump (and the folder name) on changes."""

CACHE_SUBDIR = "digits-v1"
WEIGHTS_NAME = "digits_cnn.pt"
META_NAME = "meta.json"
CALIB_NAME = "calib"
VAL_NAME = "val"

INPUT_SIZE = 8
NUM_CLASSES = 10

# Split and training recipe (all deterministic).
_TEST_SIZE = 0.25
_SPLIT_SEED = 0
_TRAIN_SEED = 0
_EPOCHS = 25
_BATCH_SIZE = 256  # large batches: few steps, so little threading overhead
_LR = 1e-2
_WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class EmbeddedDefault:
    """Everything needed to run the pipeline on the embedded default model.

    ``mean`` and ``std`` are per-channel values on a 0-1 pixel scale, exactly
    as used for training: ``x = (rgb_uint8 / 255 - mean) / std``.
    """

    arch: str
    weights: Path
    calib_dir: Path
    val_dir: Path
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int


def default_cache_root() -> Path:
    """Return the cora-onnx cache root.

    ``$CORA_ONNX_CACHE`` if set, else ``$XDG_CACHE_HOME/cora-onnx``, else
    ``~/.cache/cora-onnx``.
    """
    explicit = os.environ.get("CORA_ONNX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cora-onnx"


def digits_default(
    cache_dir: Path | None = None, *, retrain: bool = False
) -> EmbeddedDefault:
    """Return the embedded default, building it on first use.

    Args:
        cache_dir: Cache root; the model lives in ``cache_dir / "digits-v1"``.
            Defaults to :func:`default_cache_root`.
        retrain: Rebuild images and weights even if a cached copy exists.

    Returns:
        Paths and preprocessing parameters of the (cached) default model.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / CACHE_SUBDIR
    meta = None if retrain else _read_meta(target)
    if meta is None:
        meta = _build(target, replace_existing=retrain)
    else:
        logger.info("Using cached embedded default in %s", target)
    return _embedded_from(target, meta)


# --------------------------------------------------------------------------
# Cache handling
# --------------------------------------------------------------------------


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """Return the parsed ``meta.json`` of a complete cache folder, else None."""
    path = folder / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable %s: %s", path, exc)
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        logger.warning("Ignoring %s with unknown format version", path)
        return None
    return meta


def _embedded_from(folder: Path, meta: dict[str, Any]) -> EmbeddedDefault:
    """Build the :class:`EmbeddedDefault` record for a cache folder."""
    mean = tuple(float(v) for v in meta["mean"])
    std = tuple(float(v) for v in meta["std"])
    return EmbeddedDefault(
        arch="digits_cnn",
        weights=folder / WEIGHTS_NAME,
        calib_dir=folder / CALIB_NAME,
        val_dir=folder / VAL_NAME,
        input_size=INPUT_SIZE,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        num_classes=NUM_CLASSES,
    )


def _build(target: Path, *, replace_existing: bool) -> dict[str, Any]:
    """Build the cache in a temporary sibling folder and move it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    logger.info("Building embedded default (digits ConvNet) in %s", target)
    try:
        meta = _build_into(tmp)
        _move_into_place(tmp, target, replace_existing=replace_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = _read_meta(target)
    if final is None:  # pragma: no cover - only if someone deletes it meanwhile
        raise RuntimeError(f"embedded default cache vanished from {target}")
    if final != meta:
        logger.info("Another process built %s first; using its copy", target)
    return final


def _move_into_place(tmp: Path, target: Path, *, replace_existing: bool) -> None:
    """Atomically rename ``tmp`` to ``target``.

    ``os.replace`` cannot overwrite a non-empty directory, so an existing
    target is first renamed aside (when ``replace_existing``) or, if another
    process completed it concurrently, kept and ``tmp`` is discarded.
    """
    if target.exists():
        if replace_existing or _read_meta(target) is None:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if _read_meta(target) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _write_split(
    folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
) -> None:
    """Write 8x8 digits (values 0..16) as RGB PNGs into ``folder/<label>/``."""
    for digit in range(NUM_CLASSES):
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
    for image, label, index in zip(images, labels, indices, strict=True):
        grey = np.rint(image.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(folder / str(int(label)) / f"{int(index):04d}.png")


def _read_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``folder/<digit>/*.png`` back as ``(N, 8, 8, 3) uint8`` and labels."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for digit in range(NUM_CLASSES):
        for path in sorted((folder / str(digit)).glob("*.png")):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            labels.append(digit)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _to_tensor(
    images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """RGB uint8 ``NHWC`` -> normalised float32 ``NCHW`` (the pipeline's preprocessing)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _train(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Train a :class:`DigitsCNN` deterministically with Adam and a one-cycle schedule."""
    torch.manual_seed(_TRAIN_SEED)
    gen = torch.Generator().manual_seed(_TRAIN_SEED)
    model = digits_cnn(NUM_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
    steps_per_epoch = (len(x) + _BATCH_SIZE - 1) // _BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=_LR, total_steps=_EPOCHS * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(_EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), _BATCH_SIZE):
            idx = order[start : start + _BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 5 == 0:
            logger.info("  epoch %d/%d  loss %.4f", epoch + 1, _EPOCHS, total / len(x))
    model.eval()
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _build_into(folder: Path) -> dict[str, Any]:
    """Create images, weights and ``meta.json`` inside ``folder``; return the meta."""
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    start = time.perf_counter()
    digits = load_digits()
    data = np.asarray(digits.images)  # (1797, 8, 8) floats 0..16
    target = np.asarray(digits.target)
    all_idx = np.arange(len(data))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=_TEST_SIZE, random_state=_SPLIT_SEED, stratify=target
    )
    calib_dir, val_dir = folder / CALIB_NAME, folder / VAL_NAME
    _write_split(calib_dir, data[train_idx], target[train_idx], train_idx)
    _write_split(val_dir, data[test_idx], target[test_idx], test_idx)
    logger.info(
        "Wrote %d calibration and %d validation PNGs", len(train_idx), len(test_idx)
    )

    train_u8, train_y = _read_split(calib_dir)
    val_u8, val_y = _read_split(val_dir)
    pixels = train_u8[..., 0].astype(np.float64) / 255.0
    mean_v, std_v = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    mean, std = (mean_v,) * 3, (std_v,) * 3
    x_train = _to_tensor(train_u8, mean, std)
    x_val = _to_tensor(val_u8, mean, std)
    y_train, y_val = torch.from_numpy(train_y), torch.from_numpy(val_y)

    logger.info("Training DigitsCNN for %d epochs on CPU", _EPOCHS)
    # One thread: the net is tiny, and it makes the weights identical on every machine
    # (reductions differ across thread counts) and avoids OpenMP contention on busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _train(x_train, y_train)
    finally:
        torch.set_num_threads(threads)
    train_acc = _accuracy(model, x_train, y_train)
    test_acc = _accuracy(model, x_val, y_val)
    logger.info("Float accuracy: train %.4f, test %.4f", train_acc, test_acc)
    torch.save(model.state_dict(), folder / WEIGHTS_NAME)

    meta = {
        "format_version": FORMAT_VERSION,
        "arch": "digits_cnn",
        "num_classes": NUM_CLASSES,
        "input_size": INPUT_SIZE,
        "mean": list(mean),
        "std": list(std),
        "test_accuracy": round(test_acc, 6),
        "train_accuracy": round(train_acc, 6),
        "num_calib": len(train_idx),
        "num_val": len(test_idx),
        "made_with": {
            "dataset": "sklearn.datasets.load_digits",
            "pixel": "round(v * 255 / 16) replicated into RGB",
            "split": {
                "method": "sklearn.model_selection.train_test_split",
                "test_size": _TEST_SIZE,
                "random_state": _SPLIT_SEED,
                "stratify": True,
            },
            "training": {
                "optimizer": "Adam",
                "schedule": "OneCycleLR",
                "lr": _LR,
                "weight_decay": _WEIGHT_DECAY,
                "epochs": _EPOCHS,
                "batch_size": _BATCH_SIZE,
                "seed": _TRAIN_SEED,
                "preprocessing": "RGB uint8 / 255, then (x - mean) / std",
            },
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - start, 2),
        },
    }
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
