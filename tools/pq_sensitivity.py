"""Which EfficientNet-Lite0 layers product quantization hurts: PQ one group of layers at a time
(every other layer stays float), no fine-tuning, and score the result against the float network on
held-out classes (the split of tools/holdout.py: statistics from the calib images of five classes,
scores on the dev-val images of the other five). Every row runs cora_onnx.quantize (--skip leaves
the other layers float; ONNX Runtime scores the file, behind the parity gate).

    python tools/pq_sensitivity.py --blocks small --groups dw expand project head fc all --out pq_groups.jsonl
    python tools/pq_sensitivity.py --blocks large --groups expand project head fc

Groups: dw (depthwise convs), expand / project (the MBConv 1x1 convs), head (_conv_head), fc (the
classifier), stem, all (every group but the stem). One JSON line per group: top-1 of PQ and float,
top-1 agreement with float and KL(float || PQ) on the same images, search seconds.

--protocol sample (issue 15): statistics from all of imagenette/calib, scores on
imagenet-sample/even (500 classes, crop ratio 0.875), as tools/measure_pq.py --protocol sample:

    python tools/pq_sensitivity.py --protocol sample --groups expand project head fc --torch-threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cora_onnx import quantize
from cora_onnx.run.stages import load_model
from cora_onnx.torch.export import fuse_batchnorm
from cora_onnx.torch.models import default_normalization
from cora_onnx.torch.quantizers import quantizable_layers
from cora_onnx.torch.search.layers import is_depthwise
from holdout import holdout_dirs
from imagenette import SHARED, sample_paths, weights_path

GROUPS = ("dw", "expand", "project", "head", "fc", "stem")


def group_of(name: str, mod: torch.nn.Module) -> str:
    if is_depthwise(mod):
        return "dw"
    if isinstance(mod, torch.nn.Linear):
        return "fc"
    for g in ("expand", "project", "head", "stem"):
        if g in name:
            return g
    raise ValueError(f"no group for layer {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--blocks", default="small", choices=["small", "large"])
    ap.add_argument("--target", default="float", choices=["weight", "float"])
    ap.add_argument("--stats-size", type=int, default=64)
    ap.add_argument("--groups", nargs="+", default=["dw", "expand", "project", "head", "fc", "all"],
                    choices=[*GROUPS, "all"])
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--protocol", default="holdout", choices=["holdout", "sample"],
                    help="holdout: five calib classes, the other five's dev-val; sample: all calib, "
                    "imagenet-sample/even at crop ratio 0.875")
    ap.add_argument("--stats-patches", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    data = Path(args.shared) / "data/imagenette"
    mean, std = default_normalization("efficientnet_lite0")
    model = load_model("efficientnet_lite0", weights_path("efficientnet_lite0"))
    layers = quantizable_layers(fuse_batchnorm(model))
    with tempfile.TemporaryDirectory() as tmp:
        if args.protocol == "sample":
            paths = sample_paths(args.shared)
            folders = dict(calib=paths["calib"], val=paths["sample"], class_map=paths["sample_map"], crop_ratio=0.875)
            split = "sample"
        else:
            calib_dir, val_dir, split = holdout_dirs(data, Path(tmp))
            folders = dict(calib=calib_dir, val=val_dir, class_map=data / "class_map.json")
        for group in args.groups:
            want = set(GROUPS) - {"stem"} if group == "all" else {group}
            skip = tuple(n for n, m in layers.items() if group_of(n, m) not in want)
            t0 = time.perf_counter()
            res = quantize(model, **folders, method="pq", out=Path(tmp) / "m.onnx", mean=mean, std=std,
                           model_name="efficientnet_lite0", latency_runs=0, keep="none", skip=skip,
                           blocks=args.blocks, target=args.target, stats_size=args.stats_size, finetune_steps=0,
                           stats_patches=args.stats_patches)
            r = res.report
            fid = r["fidelity_to_float"]
            row = {"group": group, "blocks": args.blocks, "target": args.target, "stats_size": args.stats_size,
                   "layers": len(layers) - len(skip), "top1": r["top1"]["quantized_onnxruntime"],
                   "float_top1": r["top1"]["float"], "agreement": fid["top1_agreement"], "kl": fid["kl_divergence"],
                   "search_s": r["search_seconds"], "seconds": time.perf_counter() - t0, "protocol": args.protocol,
                   "stats_patches": args.stats_patches, "holdout": split, "scored_by": "onnxruntime"}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
