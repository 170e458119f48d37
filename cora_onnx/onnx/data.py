"""Image folders: ImageNet layout (one folder per class) or a flat folder of unlabelled images;
several folders are mixed into one set.

Images are decoded once (threads; PIL releases the GIL), resized and center-cropped to uint8
numpy arrays kept in memory and cached per process; normalization is applied per batch. No torch
here: the ONNX side (rewrite, eval, calibration) reads images without it; the torch side views
the same arrays as tensors (cora_onnx.torch.images, zero-copy).

Labels of class folders: a class map (folder name -> index) when given; else, for a 1000-class
model whose folders are all ImageNet WordNet ids (n01440764, ...), the built-in ImageNet map
(imagenet_class_index.json, shipped with the package), so any subset of ImageNet classes scores
without a map; else the sorted folder index.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cora_onnx.core.errors import DataError
from cora_onnx.core.files import check_input_dir, check_input_file
from cora_onnx.core.options import IMAGENET_MEAN, IMAGENET_STD, Preprocess, parse_floats
from cora_onnx.core.progress import progress

__all__ = ["IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "ImageSet", "permutation", "load_images", "load_class_map", "imagenet_class_map",
           "parse_floats"]

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def permutation(n: int, seed: int) -> np.ndarray:
    """The permutation torch.randperm(n, generator=torch.Generator().manual_seed(seed)) gives on
    CPU (Fisher-Yates on the 32-bit outputs of MT19937 seeded with `seed`), computed with numpy:
    subsets stay the images they were when ImageSet held tensors, so measured figures repeat."""
    bits = np.random.MT19937(0)
    bits._legacy_seeding(seed)
    raw = bits.random_raw(max(n - 1, 0))
    perm = np.arange(n, dtype=np.int64)
    for i in range(n - 1):
        z = i + int(raw[i]) % (n - i)
        perm[i], perm[z] = perm[z], perm[i]
    return perm


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Decoded images (numpy uint8, N x 3 x S x S), labels (numpy int64 model class indices, or
    None) and paths; batches() gives normalized float32 N x 3 x S x S arrays."""

    images: np.ndarray
    labels: np.ndarray | None
    paths: tuple[str, ...]
    preprocess: Preprocess

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A deterministic random subset of n images (all of them if n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = self.subset_indices(n, seed)
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],
                        tuple(self.paths[i] for i in idx.tolist()), self.preprocess)

    def subset_indices(self, n: int | None, seed: int = 0) -> np.ndarray:
        """The sorted indices of subset(n, seed) in this set; the subsets of one seed are nested
        (the first n of one permutation), so a smaller one is a part of every larger one."""
        if n is None or n >= len(self):
            return np.arange(len(self))
        return np.sort(permutation(len(self), seed)[:n])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
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


@functools.lru_cache(maxsize=1)
def imagenet_class_map() -> dict[str, int]:
    """The 1000 ImageNet-1k WordNet ids -> class index (the torchvision / ILSVRC order), shipped
    with the package."""
    text = resources.files("cora_onnx.onnx").joinpath("imagenet_class_index.json").read_text()
    data = json.loads(text)
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


def _folders(folder: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[Path]:
    """Each given folder checked (InputError naming the first missing one); duplicates dropped."""
    given = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    if not given:
        raise DataError(f"no {what} given")
    roots: list[Path] = []
    for f in given:
        root = check_input_dir(f, what)
        if any(root.resolve() == r.resolve() for r in roots):
            log.warning("%s %s is given twice; its images are used once", what, root)
            continue
        roots.append(root)
    return roots


def _class_index(names: list[str], where: str, what: str, class_map: dict[str, int] | None,
                 num_classes: int | None) -> dict[str, int]:
    """Class folder name -> model class index (module doc)."""
    if class_map is not None:
        unknown = [n for n in names if n not in class_map]
        if unknown:
            raise DataError(f"{what} {where}: folder {unknown[0]} is not in the class map "
                            f"({len(unknown)} of {len(names)} folders missing)")
        index = {n: class_map[n] for n in names}
    elif num_classes == IMAGENET_CLASSES and all(n in imagenet_class_map() for n in names):
        log.info("%s %s: %d class folders named by ImageNet WordNet ids; labels from the built-in ImageNet class map",
                 what, where, len(names))
        index = {n: imagenet_class_map()[n] for n in names}
    else:
        if num_classes is not None and len(names) != num_classes:
            raise DataError(f"{what} {where} has {len(names)} class folders but the model has "
                            f"{num_classes} classes; pass --class-map JSON (folder name -> class index)")
        index = {n: i for i, n in enumerate(names)}
    if num_classes is not None and any(not 0 <= v < num_classes for v in index.values()):
        raise DataError(f"class map gives indices outside 0-{num_classes - 1} for {what} {where}")
    return index


def load_images(folder: str | os.PathLike | Sequence[str | os.PathLike], preprocess: Preprocess = Preprocess(), *,
                labelled: bool = False,
                class_map: dict[str, int] | None = None, num_classes: int | None = None,
                workers: int | None = None, what: str = "image folder") -> ImageSet:
    """Decode every image under folder (one path, or several whose images are mixed).
    labelled=True needs one sub-folder per class in each folder (a class name may recur across
    folders: same class): label = class_map[folder name] when a class map is given; else, for a
    1000-class model whose folder names are all ImageNet WordNet ids, the built-in ImageNet index;
    else the sorted index of the distinct folder names (which then requires as many names as
    num_classes, when num_classes is given)."""
    roots = _folders(folder, what)
    where = ", ".join(map(str, roots))
    subdirs = {r: sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")) for r in roots}
    names = sorted({d.name for ds in subdirs.values() for d in ds})
    files: list[tuple[Path, int]] = []
    index: dict[str, int] | None = None
    if labelled:
        empty = [r for r in roots if not subdirs[r]]
        if empty:
            raise DataError(f"{what} {empty[0]} has no class folders; a labelled folder needs one folder per class")
        index = _class_index(names, where, what, class_map, num_classes)
    for root in roots:
        for d in subdirs[root]:
            files.extend((p, index[d.name] if index is not None else -1) for p in _list_images(d))
        if not labelled:
            files.extend((p, -1) for p in _list_images(root))
    if not files:
        raise DataError(f"{what} {where} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    key = (tuple(str(r.resolve()) for r in roots), preprocess.input_size, preprocess.crop_ratio, labelled,
           tuple(sorted(index.items())) if index is not None else None,
           tuple((str(p), p.stat().st_mtime_ns) for p, _ in files))
    cached = _CACHE.get(key)
    if cached is not None:
        return ImageSet(cached.images, cached.labels, cached.paths, preprocess)

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    log.info("decoding %d image%s from %s", len(files), "" if len(files) == 1 else "s", where)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(progress(pool.map(lambda f: _decode(f[0], preprocess.input_size, preprocess.crop_ratio), files),
                               len(files), f"decoding {where}", "images"))
    kept = [(a, f) for a, f in zip(arrays, files) if a is not None]
    if not kept:
        raise DataError(f"{what} {where}: none of its {len(files)} images could be decoded")
    if len(kept) < len(files):
        log.warning("%s %s: skipped %d of %d images that failed to decode", what, where, len(files) - len(kept),
                    len(files))
    images = np.stack([a for a, _ in kept])
    labels = np.array([lab for _, (_, lab) in kept], dtype=np.int64) if labelled else None
    result = ImageSet(images, labels, tuple(str(p) for _, (p, _) in kept), preprocess)
    _CACHE[key] = result
    return result
