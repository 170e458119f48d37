"""Foundation figures for docs/results/rtn.md (issue 2): ResNet-18 from ../shared (or EfficientNet-Lite0
with --model efficientnet_lite0), RTN per-channel at 2-8 bits: top-1 (PyTorch float /
fake-quantized, ONNX Runtime), parity, file sizes, latency.

    python tools/measure_foundation.py [--model resnet18] [--shared ../shared] [--bits 2 3 4 5 6 7 8] [--out results.json]

Float logits are computed once; each bit width runs the stages of cora_onnx.quantize
(cora_onnx.run.stages / cora_onnx.run.outcome: search -> export -> ONNX Runtime verification -> report).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from imagenette import MODELS, SHARED, data_dir, load

from cora_onnx.run.outcome import make_report, verify_quantized
from cora_onnx.run.stages import check_options, export_quantized, run_search
from cora_onnx.onnx.verify import predict_onnx, session, top1
from cora_onnx.torch.verify import predict_torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--model", default="resnet18", choices=MODELS)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, pre, data = load(args.model, args.shared)
    f_logits = predict_torch(model, data.val, 32, "PyTorch, float")  # once; every bit width is compared with it
    rows = []
    for bits in args.bits:  # the stages of cora_onnx.quantize, without writing files
        opts = check_options(val=data_dir(args.shared) / "dev-val", bits=bits, method="rtn", mean=pre.mean,
                             std=pre.std, input_size=pre.input_size, model_name=args.model,
                             latency_runs=args.latency_runs)
        searched = run_search(model, opts, None)
        exported = export_quantized(searched, opts, None)
        r = make_report(searched, exported, verify_quantized(model, exported, data, opts, f_logits), data, opts)
        if not rows:  # the float model is the same file at every bit width
            f_ort = predict_onnx(session(exported.float_bytes), data.val)
            rows.append({"bits": "float", "top1_torch": r["top1"]["float"], "top1_ort": top1(f_ort, data.val.labels),
                         "onnx_bytes": len(exported.float_bytes)})
            print(f"{args.model} float: torch {rows[0]['top1_torch']:.2f}%  ORT {rows[0]['top1_ort']:.2f}%  "
                  f"{rows[0]['onnx_bytes']/1e6:.2f} MB", flush=True)
        par = {k: v for k, v in r["parity"].items() if k not in ("reference", "limits")}
        row = {"bits": bits, "top1_torch": r["top1"]["quantized_torch"], "top1_ort": r["top1"]["quantized_onnxruntime"],
               "onnx_bytes": r["onnx_bytes"], "ratio": r["compression_ratio"], **par,
               "latency_float_ms": r["latency_ms"]["float"], "latency_quant_ms": r["latency_ms"]["quantized"],
               "search_s": r["search_seconds"], "verified": r["verified"]}
        rows.append(row)
        lat = "latency skipped" if row["latency_float_ms"] is None else \
            f"lat {row['latency_float_ms']:.1f}->{row['latency_quant_ms']:.1f} ms"
        print(f"W{bits}: torch {row['top1_torch']:.2f}%  ORT {row['top1_ort']:.2f}%  agree {par['top1_agreement']:.2f}%  "
              f"maxabs {par['max_abs_error']:.2e}  {row['onnx_bytes']/1e6:.2f} MB ({row['ratio']:.2f}x)  "
              f"{lat}  search {row['search_s']:.1f}s" + ("" if r["verified"] else "  PARITY FAILED"), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
