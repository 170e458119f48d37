"""Foundation figures for docs/results/rtn.md (issue 2): ResNet-18 from ../shared (or EfficientNet-Lite0
with --model efficientnet_lite0), RTN per-channel at 2-8 bits: top-1 (PyTorch float /
fake-quantized, ONNX Runtime), parity, file sizes, latency.

    python tools/measure_foundation.py [--model resnet18] [--shared ../shared] [--bits 2 3 4 5 6 7 8] [--out results.json]

Float logits are computed once; each bit width runs search -> export -> ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cora_onnx.data import Preprocess, load_class_map, load_images
from cora_onnx.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.models import build_model, default_normalization
from cora_onnx.pipeline import apply_plan
from cora_onnx.search import RtnSettings, search_rtn
from cora_onnx.verify import measure_latency, parity, predict_onnx, session, top1
from cora_onnx.verify_torch import predict_torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "efficientnet_lite0"])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared = Path(args.shared)
    if args.model == "resnet18":
        weights = shared / "models/resnet18-imagenet.pt"
    else:
        from cora_onnx.archs.efficientnet_lite import efficientnet_lite0_weights_path

        weights = efficientnet_lite0_weights_path()
    model = build_model(args.model, weights)
    pre = Preprocess(224, 1.0, *default_normalization(args.model))
    val = load_images(shared / "data/imagenette/dev-val", pre, labelled=True,
                      class_map=load_class_map(shared / "data/imagenette/class_map.json"), num_classes=1000)
    fused = fuse_batchnorm(model)
    f_logits = predict_torch(model, val)
    float_bytes = onnx_bytes(export_onnx(fused, 224))
    fsess = session(float_bytes)
    f_ort = predict_onnx(fsess, val)
    rows = [{"bits": "float", "top1_torch": top1(f_logits, val.labels), "top1_ort": top1(f_ort, val.labels),
             "onnx_bytes": len(float_bytes)}]
    print(f"{args.model} float: torch {rows[0]['top1_torch']:.2f}%  ORT {rows[0]['top1_ort']:.2f}%  {len(float_bytes)/1e6:.2f} MB",
          flush=True)
    for bits in args.bits:
        t0 = time.perf_counter()
        plan = search_rtn(fused, RtnSettings(bits=bits))
        search_s = time.perf_counter() - t0
        qbytes = onnx_bytes(apply_plan(export_onnx(fused, 224), plan))
        qsess = session(qbytes)
        q_ort = predict_onnx(qsess, val)
        q_torch = predict_torch(apply_plan_torch(fused, plan), val)
        lat = measure_latency({"float": fsess, "quantized": qsess}, (3, 224, 224), runs=args.latency_runs)
        par = parity(q_ort, q_torch)
        row = {"bits": bits, "top1_torch": top1(q_torch, val.labels), "top1_ort": top1(q_ort, val.labels),
               "onnx_bytes": len(qbytes), "ratio": len(float_bytes) / len(qbytes), **par,
               "latency_float_ms": lat["float"]["batch_1"]["median_ms"],
               "latency_quant_ms": lat["quantized"]["batch_1"]["median_ms"], "search_s": search_s}
        rows.append(row)
        print(f"W{bits}: torch {row['top1_torch']:.2f}%  ORT {row['top1_ort']:.2f}%  agree {par['top1_agreement']:.2f}%  "
              f"maxabs {par['max_abs_error']:.2e}  {len(qbytes)/1e6:.2f} MB ({row['ratio']:.2f}x)  "
              f"lat {row['latency_float_ms']:.1f}->{row['latency_quant_ms']:.1f} ms  search {search_s:.1f}s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
