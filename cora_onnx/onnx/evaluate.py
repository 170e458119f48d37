"""Top-1 of an ONNX classifier on labelled image folders, in ONNX Runtime (the `eval` command;
`bench --data` uses the same checks). ONNX side: no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from cora_onnx.onnx.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, Preprocess, load_class_map, load_images, parse_floats
from cora_onnx.core.errors import DataError, SettingsError
from cora_onnx.core.files import check_output_path
from cora_onnx.core.modelfile import read_model
from cora_onnx.onnx.report import write_report
from cora_onnx.onnx.verify import image_input, predict_onnx, session, top1

__all__ = ["evaluate", "model_preprocess", "preprocess_meta", "classifier_images", "classifier_logits",
           "session_top1"]


def preprocess_meta(sess) -> dict:
    """The preprocessing cora-onnx stored in the model's metadata (ONNX or ORT format), or {}."""
    props = sess.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props.get("cora_onnx.preprocess", "{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def model_preprocess(sess, spec, what: str, *, input_size=None, crop_ratio=None, mean=None, std=None) -> Preprocess:
    """Preprocess for a session: options first, then the model's metadata, then its input shape
    (ImageNet mean/std and 224 px when nothing says otherwise). An input size the model's fixed
    input cannot take is a SettingsError. spec: cora_onnx.onnx.verify.image_input(sess)."""
    meta = preprocess_meta(sess)
    size = input_size or meta.get("input_size") or spec.size or 224
    if spec.size is not None and size != spec.size:
        raise SettingsError(f"{what} takes {spec.size}x{spec.size} images (fixed in the model), got input size {size}")
    return Preprocess(input_size=int(size), crop_ratio=crop_ratio if crop_ratio is not None else
                      float(meta.get("crop_ratio", 1.0)),
                      mean=parse_floats(mean or meta.get("mean") or IMAGENET_MEAN, what="mean"),
                      std=parse_floats(std or meta.get("std") or IMAGENET_STD, what="std"))


def classifier_images(sess, what: str, data, pre: Preprocess, cmap: dict | None) -> ImageSet:
    """The labelled images of `data` (a folder or a list of folders, mixed) for a classifier
    session: DataError naming the model when its output is not N x classes logits covering the
    classes of the folder."""
    out = sess.get_outputs()[0]
    shape = out.shape
    if shape is not None and len(shape) != 2:
        raise DataError(f"{what}: output {out.name!r} has shape {list(shape)}, not N x classes logits: the model is "
                        f"not a classifier, so it has no top-1 on {_where(data)}")
    n = shape[-1] if shape and isinstance(shape[-1], int) else None
    roots = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    where = _where(roots)
    if n is not None and cmap is not None:
        folders = [d.name for r in roots if r.is_dir() for d in r.iterdir() if d.is_dir() and d.name in cmap]
        top = max((cmap[f] for f in folders), default=-1)
        if top >= n:
            raise DataError(f"{what}: output {out.name!r} gives {n} values per image, so it is not a classifier over "
                            f"the classes of {where} (class map indices up to {top})")
    return load_images(roots if len(roots) > 1 else roots[0], pre, labelled=True, class_map=cmap, num_classes=n,
                       what="data folder")


def _where(data) -> str:
    return ", ".join(map(str, data if isinstance(data, (list, tuple)) else [data]))


def classifier_logits(logits: np.ndarray, labels: np.ndarray, what: str, data) -> np.ndarray:
    """logits, or DataError when they are not N x classes over the labels' classes (data: the
    folder or folders the labels come from, for the message)."""
    if logits.ndim != 2:
        raise DataError(f"{what}: output has shape {list(logits.shape)}, not N x classes logits: the model is not a "
                        "classifier")
    if int(labels.max()) >= logits.shape[1]:
        raise DataError(f"{what}: output gives {logits.shape[1]} values per image, so it is not a classifier over the "
                        f"classes of {_where(data)} (labels up to {int(labels.max())})")
    return logits


def session_top1(sess, what: str, data, pre: Preprocess, cmap: dict | None,
                 batch_size: int | None = None) -> tuple[float, int]:
    """(top-1 in %, images) of a classifier session on the labelled folder(s) `data`."""
    images = classifier_images(sess, what, data, pre, cmap)
    logits = predict_onnx(sess, images) if batch_size is None else predict_onnx(sess, images, batch_size)
    return top1(classifier_logits(logits, images.labels, what, data), images.labels), len(images)


def evaluate(onnx_model: str | Path, data: str | Path | Sequence[str | Path], class_map: str | Path | None = None, *,
             input_size: int | None = None, crop_ratio: float | None = None, mean=None, std=None,
             batch_size: int = 32, threads: int | None = None, report: str | Path | None = None) -> dict:
    """Top-1 of the ONNX (or ORT-format) classifier `onnx_model` on the labelled folder(s) `data`.
    Preprocessing: the arguments given, else the model's metadata, else its input shape. Returns
    {"model", "format", "top1", "images", "input": {name, layout, fixed_batch}, "note"} and writes
    it (without "note") to `report` as JSON when given."""
    if report is not None:
        check_output_path(report, "report")
    mf = read_model(onnx_model)
    sess = session(mf, threads=threads)
    spec = image_input(sess, str(onnx_model))
    pre = model_preprocess(sess, spec, str(onnx_model), input_size=input_size, crop_ratio=crop_ratio, mean=mean,
                           std=std)
    cmap = load_class_map(class_map) if class_map else None
    acc, n = session_top1(sess, str(onnx_model), list(data) if isinstance(data, (list, tuple)) else data, pre, cmap,
                          batch_size)
    result = {"model": str(onnx_model), "format": mf.format, "top1": acc, "images": n,
              "input": {"name": spec.name, "layout": spec.layout, "fixed_batch": spec.batch}}
    if report is not None:
        write_report(result, report)
    return {**result, "note": spec.describe()}
