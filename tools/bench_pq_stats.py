"""Cost of the PQ search's per-layer statistics: layer inputs served from cached stage inputs
(cora_onnx.torch.search.staged, what cora-onnx does for chains of stages) against a forward pass from the
image for every layer (what it did before, and still does for other models). The same search runs
twice in one process on the same machine, first with the cache, then without; prints both times,
their ratio, and whether the two plans are the same (codes and uniform grids).

    python tools/bench_pq_stats.py [--model efficientnet_lite0|resnet18] [--levers u3dw4p+oc+ft0+fc-weight+patches16]
        [--torch-threads 2]

Search settings come from tools/measure_pq.py's levers; calibration: ../shared imagenette/calib
(crop ratio 0.875, all 1,600 images). Time it alone: other jobs on the machine inflate both runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from cora_onnx.onnx.data import Preprocess, load_images
from cora_onnx.torch.export import fuse_batchnorm
from cora_onnx.torch.models import build_model, default_normalization
from cora_onnx.torch.search import PqSettings, search_pq
from imagenette import SHARED, weights_path
from measure_pq import lever_options, pq_settings_kw


def _same(a, b) -> bool:
    for la, lb in zip(a.layers, b.layers):
        if (la.codebook is None) != (lb.codebook is None):
            return False
        if la.codebook is not None and not np.array_equal(la.codebook.codes, lb.codebook.codes):
            return False
        if la.uniform is not None and not np.array_equal(la.uniform.q, lb.uniform.q):
            return False
    return len(a.layers) == len(b.layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet18"])
    ap.add_argument("--levers", default="u3dw4p+oc+ft0+fc-weight+patches16")
    ap.add_argument("--calib-size", type=int, default=1600)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--out", help="append the JSON line to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("cora_onnx.torch.search.staged").setLevel(logging.INFO)
    torch.set_num_threads(args.torch_threads)
    calib = load_images(Path(SHARED) / "data/imagenette/calib",
                        Preprocess(224, 0.875, *default_normalization(args.model)))
    fused = fuse_batchnorm(build_model(args.model, weights_path(args.model)))
    kw = {"calib_size": args.calib_size, **lever_options(args.levers)}
    settings = PqSettings(**pq_settings_kw(kw))
    rec = {"model": args.model, "levers": args.levers, "calib_images": min(args.calib_size, len(calib)),
           "torch_threads": args.torch_threads}
    plans = {}
    for mode in ("cached", "full passes"):
        # full passes: no stage input fits a cache of 0 bytes, so a forward from the image per layer
        mode_settings = settings if mode == "cached" else dataclasses.replace(settings, cache_bytes=0)
        t0 = time.perf_counter()
        plans[mode] = search_pq(fused, mode_settings, calib)
        key = "seconds_" + mode.replace(" ", "_")
        rec[key] = round(time.perf_counter() - t0, 1)
        print(f"{mode}: {rec[key]} s", flush=True)
    rec["ratio"] = round(rec["seconds_full_passes"] / rec["seconds_cached"], 2)
    rec["same_plan"] = _same(plans["cached"], plans["full passes"])
    print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
