"""Tests for the embedded default (digits ConvNet trained on sklearn's digits)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cora_onnx.torch.embedded as embedded
from cora_onnx.torch.archs.digits import DigitsCNN, digits_cnn
from cora_onnx.torch.embedded import EmbeddedDefault, default_cache_root, digits_default

_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
EXPECTED_KEYS = (
    {f"features.{i}.weight" for i in (0, 3, 6, 9)}  # bias-free convolutions
    | {f"features.{i}.{name}" for i in (1, 4, 7, 10) for name in _BN_BUFFERS}
    | {"fc.weight", "fc.bias"}
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Train on one thread: on a busy 2-core machine OpenMP threads contend badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache root, so nothing touches the user's cache."""
    return tmp_path_factory.mktemp("cora-cache")


@pytest.fixture(scope="module")
def built(cache_root: Path) -> EmbeddedDefault:
    """Build the embedded default once for the whole module."""
    return digits_default(cache_root)


def _read_folder(folder: Path, emb: EmbeddedDefault) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``folder/<digit>/*.png`` with PIL and preprocess like the pipeline."""
    images, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for png in sorted(class_dir.glob("*.png")):
            with Image.open(png) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
            labels.append(int(class_dir.name))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    mean = torch.tensor(emb.mean).view(1, 3, 1, 1)
    std = torch.tensor(emb.std).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


def test_first_call_builds_folders(built: EmbeddedDefault, cache_root: Path) -> None:
    assert built.arch == "digits_cnn"
    assert built.input_size == 8 and built.num_classes == 10
    assert built.weights.parent == cache_root / "digits-v1"
    assert all(0.0 < s for s in built.std) and all(0.0 < m < 1.0 for m in built.mean)
    total = 0
    for split in (built.calib_dir, built.val_dir):
        classes = sorted(p.name for p in split.iterdir() if p.is_dir())
        assert classes == [str(d) for d in range(10)]
        total += sum(1 for _ in split.glob("*/*.png"))
    assert total == 1797
    with Image.open(next(built.val_dir.glob("0/*.png"))) as img:
        assert img.mode == "RGB" and img.size == (8, 8)
    # No temporary build folders are left behind.
    assert [p.name for p in cache_root.iterdir()] == ["digits-v1"]


def test_weights_reach_accuracy(built: EmbeddedDefault) -> None:
    state = torch.load(built.weights, map_location="cpu", weights_only=True)
    assert set(state) == EXPECTED_KEYS
    model = digits_cnn()
    assert isinstance(model, DigitsCNN)
    model.load_state_dict(state)
    model.eval()
    x, y = _read_folder(built.val_dir, built)
    assert len(y) == 450
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.95
    meta = json.loads((built.weights.parent / "meta.json").read_text())
    assert meta["test_accuracy"] == pytest.approx(acc, abs=1e-4)


def test_second_call_reuses_cache(built: EmbeddedDefault, cache_root: Path) -> None:
    before = built.weights.stat().st_mtime_ns
    again = digits_default(cache_root)
    assert again == built
    assert built.weights.stat().st_mtime_ns == before


def test_default_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORA_ONNX_CACHE", str(tmp_path / "explicit"))
    assert default_cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("CORA_ONNX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "cora-onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_root() == Path.home() / ".cache" / "cora-onnx"


def test_retrain_replaces_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded, "_EPOCHS", 1)  # only the cache handling matters here
    first = digits_default(tmp_path)
    (first.weights.parent / "stale.txt").write_text("from the old build")
    before = first.weights.stat().st_mtime_ns
    second = digits_default(tmp_path, retrain=True)
    assert second == first
    assert second.weights.stat().st_mtime_ns != before
    assert not (second.weights.parent / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["digits-v1"]
