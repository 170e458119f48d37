"""Held-out-class split of ../shared's ten Imagenette classes, for checking that a method's gains are
not a class-prior effect: calibration (and any distillation or bias fitting on it) sees only the
calibration images of every other class (sorted WordNet ids 0, 2, 4, 6, 8), and top-1 is scored on
the dev-val images of the other five classes, which the method has never seen. Float is scored on
the same images. The folders are symlinked into a temporary directory, so the product path
(`cora_onnx.quantize`, the CLI) runs on them unchanged; the class map stays the full one.
"""

from __future__ import annotations

from pathlib import Path


def holdout_dirs(data: Path, tmp: Path) -> tuple[Path, Path, dict]:
    """(calib_dir, val_dir, description) under tmp; data = ../shared/data/imagenette."""
    classes = sorted(p.name for p in (data / "calib").iterdir() if p.is_dir())
    seen, held = classes[0::2], classes[1::2]
    calib, val = tmp / "holdout-calib", tmp / "holdout-val"
    for dst, src, names in ((calib, data / "calib", seen), (val, data / "dev-val", held)):
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            (dst / n).symlink_to((src / n).resolve(), target_is_directory=True)
    return calib, val, {"calib_classes": seen, "val_classes": held}
