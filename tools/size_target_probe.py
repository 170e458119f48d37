"""Which harm measure and which fit for size targets (issue 26), on the many-class protocol.

Measures the menu once (statistics, every encoding's output error, each layer's sensitivity:
cora_onnx.torch.search.auto.measure_menu), then for every target ratio, harm measure and fit
variant chooses the encodings under the same byte budget `cora-onnx quantize --target-ratio R`
would have, fits them and scores the PyTorch model on imagenet-sample/even (500 classes, crop
0.875): top-1 agreement with float and mean KL, then top-1. The PyTorch model is what the ONNX
file computes (the quantize runs check it in ONNX Runtime; tools/size_target.sh).

    python tools/size_target_probe.py --model efficientnet_lite0 --ratios 10 15 20 \\
        --harms kl output --fits float refit --torch-threads 1 --out probe.jsonl

Variants: --harms kl (measured KL per unit of output error, the default) / output (the relative
output error alone, every layer weighted the same); --fits float (the chosen encodings fitted to
the float weights on the float network's statistics, the default) / refit (layer after layer to
the float network's output on the partially quantized network). Each row is one JSON line: ratio, harm, fit, predicted bytes and harm, the encodings,
agreement, KL, top-1, seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from cora_onnx.core.budget import choose
from cora_onnx.core.encoding import Encoding, encoding_summary
from cora_onnx.onnx.data import load_class_map, load_images
from cora_onnx.onnx.verify import fidelity, top1
from cora_onnx.run.stages import check_options, size_budget
from cora_onnx.torch.models import build_model, default_normalization, packaged_weights
from cora_onnx.core.plan import Plan
from cora_onnx.torch.export import apply_plan_torch, quantizable_layers
from cora_onnx.torch.search.auto import finetune_choice, fit_choice, harm_table, measure_menu, plan_layers
from cora_onnx.torch.verify import predict_torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="state_dict [the package's for efficientnet_lite0; "
                                                     "../shared/models/resnet18-imagenet.pt for resnet18]")
    ap.add_argument("--ratios", type=float, nargs="+", default=[10, 15, 20])
    ap.add_argument("--harms", nargs="+", default=["kl"], choices=["kl", "output"])
    ap.add_argument("--fits", nargs="+", default=["float"], choices=["float", "refit"])
    ap.add_argument("--finetune", type=int, nargs="+", default=[0],
                    help="distillation steps on the adapters and biases after the fit (0: none); one row each")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an AutoSettings field for every row (JSON value), e.g. stats_patches=64")
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=None, help="append the rows (JSON lines) here")
    ap.add_argument("--cache", default=None, help="keep the measured menu in this file (torch.save) and reuse it "
                                                  "when it exists (same model, options and fits)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[probe] %(message)s", stream=sys.stderr)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    shared = Path(args.shared)
    weights = args.weights or (packaged_weights(args.model) if args.model == "efficientnet_lite0" else
                               shared / "models" / "resnet18-imagenet.pt")
    mean, std = default_normalization(args.model)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    calib_dir = shared / "data" / "imagenette" / "calib"
    sample_dir = shared / "data" / "imagenet-sample" / "even"
    t0 = time.perf_counter()
    model = build_model(args.model, weights).eval()
    with tempfile.TemporaryDirectory() as tmp:
        opts = check_options(calib=calib_dir, val=sample_dir, out=Path(tmp) / "m.onnx", mean=mean, std=std,
                             crop_ratio=0.875, target_ratio=args.ratios[0], model_name=args.model, **options)
        budget = size_budget(model, opts)
    pre = opts.pre
    sample = load_images(sample_dir, pre, labelled=True, class_map=load_class_map(sample_dir.parent / "class_map.json"),
                         num_classes=1000)
    calib = load_images(calib_dir, pre)
    fused = budget.fused
    float_logits = predict_torch(fused, sample)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if args.cache and Path(args.cache).exists():
        measured = torch.load(args.cache, weights_only=False)
        live = quantizable_layers(fused)  # the fused model's own modules (the pickle holds copies)
        measured = dataclasses.replace(measured, layers={n: live[n] for n in measured.layers})
        logging.info("measured menu read from %s", args.cache)
    else:
        measured = measure_menu(fused, budget.settings, calib)
        if args.cache:
            torch.save(measured, args.cache)
    measure_s, measure_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    costs = budget.table.costs
    for ratio in args.ratios:
        limit = int(budget.float_bytes // ratio)
        for harm_name in args.harms:
            harm = harm_table(measured, harm_name)
            cost = {n: {e.label: int(costs[n][e.label]) for e in measured.menus[n]} for n in measured.layers}
            choice = choose(harm, cost, limit - budget.table.fixed)
            chosen = {n: Encoding.parse(choice.options[n]) for n in measured.layers}
            for fit in args.fits:
                settings = dataclasses.replace(budget.settings, refit=fit == "refit", harm=harm_name)
                t1, c1 = time.perf_counter(), time.process_time()
                student, results = fit_choice(fused, measured, chosen, settings, calib)
                fit_s, fit_cpu = time.perf_counter() - t1, time.process_time() - c1
                for steps in args.finetune:
                    ft, t2, c2 = {}, time.perf_counter(), time.process_time()
                    res = results
                    if steps:
                        res = copy.deepcopy(results)
                        ft = finetune_choice(fused, copy.deepcopy(student), res,
                                             dataclasses.replace(settings, finetune_steps=steps), calib)
                    # the model the file holds (adapters on their grids, float16 biases)
                    plan = Plan("auto", {}, plan_layers(measured, chosen, res))
                    logits = predict_torch(apply_plan_torch(fused, plan), sample)
                    fid = fidelity(logits, float_logits)
                    row = {"model": args.model, "ratio": ratio, "harm": harm_name, "fit": fit, "finetune": steps,
                           "options": options, "limit_bytes": limit, "fixed_bytes": budget.table.fixed,
                           "encodings_bytes": choice.cost, "predicted_harm": choice.harm, "exact": choice.exact,
                           "encodings": encoding_summary(chosen.values()),
                           "layers": {n: e.label for n, e in chosen.items()},
                           "agreement": fid["top1_agreement"], "kl": fid["kl_divergence"],
                           "top1": top1(logits, sample.labels), "float_top1": top1(float_logits, sample.labels),
                           "fit_errors": {n: r["error"] for n, r in results.items()}, "finetune_log": ft,
                           "seconds": {"setup": setup, "measure": measure_s, "measure_cpu": measure_cpu, "fit": fit_s,
                                       "fit_cpu": fit_cpu, "finetune": time.perf_counter() - t2,
                                       "finetune_cpu": time.process_time() - c2, **measured.seconds},
                           "torch_threads": torch.get_num_threads(),
                           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
                    _emit(args, row)


def _emit(args, row: dict) -> None:
    print(f"{row['model']} {row['ratio']:g}x harm={row['harm']} fit={row['fit']} finetune={row['finetune']}: agreement "
          f"{row['agreement']:.1f}% KL {row['kl']:.3f} top-1 {row['top1']:.1f}% | {row['encodings']} | "
          f"{row['fixed_bytes'] + row['encodings_bytes']:,} <= {row['limit_bytes']:,}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
