"""Image folders: ImageNet layout (one folder per class) or a flat folder of unlabelled images.

Images are decoded once (threads; PIL releases the GIL), resized and center-cropped to uint8
tensors kept in memory and cached per process; normalization is applied per batch.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import DataError, SettingsError
from .io import check_input_dir, check_input_file

__all__ = ["IMAGE_SUFFIXES", "Preprocess", "ImageSet", "load_images", "load_class_map", "parse_floats"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def parse_floats(text: str | Sequence[float], n: int = 3, what: str = "value") -> tuple[float, ...]:
    """Parse '0.485,0.456,0.406' or '127/255' (one value repeated) into n floats."""
    if not isinstance(text, str):
        vals = tuple(float(v) for v in text)
    else:
        try:
            vals = tuple(float(Fraction(v.strip())) for v in text.split(",") if v.strip())
        except (ValueError, ZeroDivisionError):
            raise SettingsError(f"{what} must be numbers like 0.485,0.456,0.406 or 127/255, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n or not all(np.isfinite(vals)):
        raise SettingsError(f"{what} needs 1 or {n} finite numbers, got {text!r}")
    return vals


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to round(input_size / crop_ratio), center-crop input_size, RGB,
    scale to [0, 1], normalize with mean/std (given on that 0-1 scale)."""

    input_size: int = 224
    crop_ratio: float = 1.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not 1 <= int(self.input_size) <= 4096:
            raise SettingsError(f"input size must be 1-4096 pixels, got {self.input_size}")
        if not 0.1 <= self.crop_ratio <= 1.0:
            raise SettingsError(f"crop ratio must be in [0.1, 1], got {self.crop_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise SettingsError(f"mean and std need 3 values each, std > 0; got {self.mean} / {self.std}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> normalized float32."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (images.to(torch.float32) - mean) / std


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Decoded images (uint8, N x 3 x S x S), labels (int64 model class indices, or None) and paths."""

    images: torch.Tensor
    labels: torch.Tensor | None
    paths: tuple[str, ...]
    preprocess: Preprocess

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A deterministic random subset of n images (all of them if n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],
                        tuple(self.paths[i] for i in idx.tolist()), self.preprocess)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Normalized float32 batches in order."""
        for i in range(0, len(self), batch_size):
            yield self.preprocess.normalize(self.images[i:i + batch_size])


def load_class_map(path: str | os.PathLike) -> dict[str, int]:
    p = check_input_file(path, "class map")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"class map {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise DataError(f"class map {p} must be a JSON object of folder name -> class index")
    return {str(k): int(v) for k, v in data.items()}


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _decode(path: Path, size: int, crop_ratio: float) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            short = round(size / crop_ratio)
            w, h = im.size
            if min(w, h) != short:
                scale = short / min(w, h)
                im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
                w, h = im.size
            if (w, h) != (size, size):
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as exc:  # PIL raises many types for broken files
        log.warning("skipping %s: cannot decode (%s)", path, str(exc).splitlines()[0][:120])
        return None


_CACHE: dict[tuple, ImageSet] = {}


def load_images(folder: str | os.PathLike, preprocess: Preprocess = Preprocess(), *, labelled: bool = False,
                class_map: dict[str, int] | None = None, num_classes: int | None = None,
                workers: int | None = None, what: str = "image folder") -> ImageSet:
    """Decode every image under folder. labelled=True needs one sub-folder per class: label =
    class_map[folder name] when a class map is given, else the sorted folder index (which then
    requires as many folders as num_classes, when num_classes is given)."""
    root = check_input_dir(folder, what)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    if subdirs:
        if labelled:
            if class_map is not None:
                unknown = [d.name for d in subdirs if d.name not in class_map]
                if unknown:
                    raise DataError(f"{what} {root}: folder {unknown[0]} is not in the class map "
                                    f"({len(unknown)} of {len(subdirs)} folders missing)")
                index = {d.name: class_map[d.name] for d in subdirs}
            else:
                if num_classes is not None and len(subdirs) != num_classes:
                    raise DataError(f"{what} {root} has {len(subdirs)} class folders but the model has "
                                    f"{num_classes} classes; pass --class-map JSON (folder name -> class index)")
                index = {d.name: i for i, d in enumerate(subdirs)}
            if num_classes is not None and any(not 0 <= v < num_classes for v in index.values()):
                raise DataError(f"class map gives indices outside 0-{num_classes - 1} for {what} {root}")
        else:
            index = {d.name: -1 for d in subdirs}
        for d in subdirs:
            files.extend((p, index[d.name]) for p in _list_images(d))
        files.extend((p, -1) for p in _list_images(root) if not labelled)
    else:
        if labelled:
            raise DataError(f"{what} {root} has no class folders; a labelled folder needs one folder per class")
        files = [(p, -1) for p in _list_images(root)]
    if not files:
        raise DataError(f"{what} {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    key = (str(root.resolve()), preprocess.input_size, preprocess.crop_ratio, labelled,
           tuple(sorted(index.items())) if subdirs else None,
           tuple((str(p), p.stat().st_mtime_ns) for p, _ in files))
    cached = _CACHE.get(key)
    if cached is not None:
        return ImageSet(cached.images, cached.labels, cached.paths, preprocess)

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    log.info("decoding %d image%s from %s", len(files), "" if len(files) == 1 else "s", root)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda f: _decode(f[0], preprocess.input_size, preprocess.crop_ratio), files))
    kept = [(a, f) for a, f in zip(arrays, files) if a is not None]
    if not kept:
        raise DataError(f"{what} {root}: none of its {len(files)} images could be decoded")
    if len(kept) < len(files):
        log.warning("%s %s: skipped %d of %d images that failed to decode", what, root, len(files) - len(kept), len(files))
    images = torch.from_numpy(np.stack([a for a, _ in kept]))
    labels = torch.tensor([lab for _, (_, lab) in kept], dtype=torch.int64) if labelled else None
    result = ImageSet(images, labels, tuple(str(p) for _, (p, _) in kept), preprocess)
    _CACHE[key] = result
    return result
