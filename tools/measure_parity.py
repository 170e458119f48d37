"""The parity gate on correct and corrupted files: the figures docs/verification.md quotes.

For each case, the model is quantized through the library's stages (calibration on
../shared/data/imagenette/calib, parity on ../shared/data/imagenet-sample/even, --crop-ratio
0.875, no timing), optionally corrupted (one layer's weight scale multiplied in the file: what a
wrong pass would write), and verified. Printed per case: the end-to-end parity figures (top-1
agreement and max |logit diff| relative to the largest logit, ONNX Runtime vs its PyTorch
reference on all images), the verdict the end-to-end gate gave before the tensor-by-tensor check
(the limits of commit 9860ab2: 95% / 0.25 against the simulation, 99% / 1e-3 weight-only), the
tensor-by-tensor figures (integer activations: each quantized tensor of the simulation computed
from ONNX Runtime's own integers, on 8 images: the largest difference in quantization steps, the
largest share of a tensor's values that differ, the relative error of the float outputs), the
output spread (0: constant outputs) and today's verdict. "Before" figures with integer
activations are against the simulation as it was (float biases, not ONNX Runtime's INT32 ones).

Cases: NAME[:bits][:corrupt=LAYER*FACTOR], NAME = resnet18 (the shared ImageNet weights), digits_cnn
(the embedded default, its own images) or any torchvision architecture (random weights, seed 0,
BatchNorm statistics measured on 64 calibration images). Integer activations unless -w.

    PYTHONPATH=. python tools/measure_parity.py resnet18:4 mobilenet_v3_large:8 mnasnet1_0:8 \\
        resnet18:4:corrupt=layer2.0.conv1*1.05 resnet18:4:corrupt=layer2.0.conv1*4 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision

from cora_onnx.onnx.verify import PARITY_LIMITS, parity, predict_onnx, session
from cora_onnx.run.outcome import verify_quantized
from cora_onnx.run.stages import check_options, export_quantized, load_data, run_search
from cora_onnx.torch.export import apply_plan_torch
from cora_onnx.torch.models import build_model
from cora_onnx.torch.verify import predict_torch

ROOT = Path(__file__).resolve().parents[1]

OLD_LIMITS = {"simulated": (95.0, 0.25), "exact": (99.0, 1e-3), "float_activations": (90.0, 0.5)}  # 9860ab2


def measure_batchnorm(model: torch.nn.Module, images: np.ndarray, whole: bool = False) -> torch.nn.Module:
    """BatchNorm statistics of a randomly initialized model measured on real images (reset, momentum
    None, the images through the model, then eval): logits of normal size instead of ~1e-9. Only
    the BatchNorm layers run in train mode, unless `whole` (dropout and stochastic depth active too)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.train() if whole else model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    return model.eval()


def corrupt(data: bytes, layer: str, factor: float) -> bytes:
    proto = onnx.load_from_string(data)
    name = f"{layer}.weight_scale"
    for t in proto.graph.initializer:
        if t.name == name:
            arr = onnx.numpy_helper.to_array(t) * np.float32(factor)
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
            return proto.SerializeToString()
    raise SystemExit(f"no initializer {name} in the file")


def run_case(case: str, shared: Path, weight_only: bool, torch_threads: int, bn_whole: bool = False) -> dict:
    parts = case.split(":")
    arch, bits, bad = parts[0], 8, None
    for p in parts[1:]:
        if p.startswith("corrupt="):
            layer, factor = p[len("corrupt="):].rsplit("*", 1)
            bad = (layer, float(factor))
        else:
            bits = int(p)
    torch.set_num_threads(torch_threads)
    data_dir = shared / "data"
    if arch == "digits_cnn":
        from cora_onnx.torch.embedded import digits_default

        d = digits_default()
        model, calib, val = build_model(d.arch, d.weights), d.calib_dir, d.val_dir
        pre = {"input_size": d.input_size, "mean": d.mean, "std": d.std}
    else:
        calib, val = data_dir / "imagenette/calib", data_dir / "imagenet-sample/even"
        pre = {"crop_ratio": 0.875}
        if arch == "resnet18":
            model = build_model("resnet18", shared / "models/resnet18-imagenet.pt")
        else:
            torch.manual_seed(0)
            model = getattr(torchvision.models, arch)().eval()
    opts = check_options(calib=[calib], val=[val], bits=bits, act_bits=None if weight_only else 8, latency_runs=0,
                         threads=torch_threads, out=Path("/tmp/measure_parity_unused.onnx"), **pre)
    data = load_data(model, opts.pre, opts.calib, opts.val, None)
    if arch not in ("resnet18", "digits_cnn"):
        measure_batchnorm(model, opts.pre.normalize(data.calib.subset(64, 0).images), bn_whole)
    t0 = time.perf_counter()
    searched = run_search(model, opts, data.calib)
    exported = export_quantized(searched, opts, data.calib)
    if bad is not None:
        exported = dataclasses.replace(exported, quant_bytes=corrupt(exported.quant_bytes, *bad))
    v = verify_quantized(model, exported, data, opts)
    par = v.figures["parity"]
    before = par
    if v.kind == "simulated":  # before: the simulation with float biases, judged end to end (9860ab2)
        weights = apply_plan_torch(searched.fused, searched.plan, opts.merge_bits).state_dict()
        old_sim = copy.deepcopy(exported.qmodel)
        old_sim.gm.load_state_dict({k: w for k, w in weights.items() if k.endswith(".bias")}, strict=False)
        images = data.val if data.val is not None else data.calib
        ort = predict_onnx(session(exported.quant_bytes, threads=torch_threads), images)
        before = parity(ort, predict_torch(old_sim, images))
    old_agree, old_rel = OLD_LIMITS[v.kind]
    old_ok = before["top1_agreement"] >= old_agree and before["relative_max_error"] <= old_rel
    t = par.get("tensors") or {}
    return {"case": case, "reference": v.kind, "images": par["images"], "agreement": par["top1_agreement"],
            "relative_max_error": par["relative_max_error"], "agreement_before": before["top1_agreement"],
            "relative_max_error_before": before["relative_max_error"], "old_gate": "pass" if old_ok else "refuse",
            "max_steps": (t.get("worst") or {}).get("max_steps"), "mismatch": (t.get("worst") or {}).get("mismatch"),
            "worst_tensor": (t.get("worst") or {}).get("tensor"), "output_error": t.get("output_relative_error"),
            "instrumented_exact": t.get("instrumented_exact"), "output_spread": par["output_spread"],
            "fidelity_to_float": v.figures.get("fidelity_to_float"),
            "gate": "pass" if v.verified else ("constant" if v.verdict.constant_output else "refuse"), "failure": v.failure,
            "limits": dataclasses.asdict(PARITY_LIMITS[v.kind]), "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.jsonl")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("-w", "--weight-only", action="store_true", help="float activations (weight-only files)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--bn-whole-model", action="store_true",
                    help="measure BatchNorm statistics with the whole model in train mode (dropout, stochastic depth)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    print("| case | reference | before: agreement, max logit diff / largest | gate before | now: agreement, "
          "max logit diff / largest | max steps | values off (worst tensor) | output error | spread | gate now |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases:
        r = run_case(case, args.shared, args.weight_only, args.torch_threads, args.bn_whole_model)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {case} | {r['reference']} | {r['agreement_before']:.1f}%, {r['relative_max_error_before']:.3g} | "
              f"{r['old_gate']} | {r['agreement']:.1f}%, {r['relative_max_error']:.3g} | "
              f"{fmt(r['max_steps'], 'd')} | {fmt(r['mismatch'] and r['mismatch'] * 100, '.2g')}% "
              f"({r['worst_tensor'] or '-'}) | {fmt(r['output_error'], '.2g')} | {fmt(r['output_spread'], '.3g')} | "
              f"{r['gate']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
