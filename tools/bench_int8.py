"""Integer-inference figures for docs/results/int8.md (issue 5): ResNet-18 and EfficientNet-Lite0 from
../shared, calibrated on the 1,600 calibration images, scored on dev-val (1,000 images).

Rows: float | onnxruntime.quantization.quantize_static (QDQ, u8 activations, per-channel s8
weights, reduce_range, MinMax, same calibration images) | cora-onnx W8A8: weights at the CPU's
integer-kernel width (7 bits on AVX2 without VNNI), either rounded to nearest on a per-channel grid
(`--weights rtn`, `--weight-clips`) or by CoRa's default preset without adapters (`--weights cora`:
GPTQ rounding, bias fine-tuning); activation ranges by minmax / percentile /
mse (`--calib-methods`), all from ONE calibration pass per weight grid.
Top-1 in ONNX Runtime, and how closely each row follows the float model on the same images (top-1
agreement and mean KL divergence, cora_onnx.onnx.verify.fidelity: far less noisy than top-1 on 1,000
images); batch-1 (and batch-8) latency of all rows in one interleaved run.

    python tools/bench_int8.py [--models resnet18 efficientnet_lite0] [--calib-images 1600]
        [--runs 50] [--out results/int8.json] [--plot results/int8.png]

The machine may be shared with other jobs: compare latency ratios from one run, not absolute ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from imagenette import SHARED



def ort_quantize_static(float_bytes: bytes, calib, batch_size: int = 16) -> bytes:
    """What a user does with ONNX Runtime's own tool (the bar from the issue)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = calib.batches(batch_size)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    # No CalibMaxIntermediateOutputs: in ORT 1.32 MinMaxCalibrater.collect_data discards the
    # collected batches each time that many are buffered (clear_collected_data without merging
    # their ranges; microsoft/onnxruntime#18893, fix proposed in PR #20226, still so in 1.32), so
    # only the last few batches would be calibrated. Without it the calibrator keeps two scalars
    # per tensor and batch: small.
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "static.onnx"
        src.write_bytes(float_bytes)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return dst.read_bytes()


def run_model(name: str, shared: Path, args) -> list[dict]:
    import onnx_ir as ir
    import torch
    from imagenette import load

    from cora_onnx.onnx.calibrate import CalibSettings
    from cora_onnx.torch.export import apply_plan_torch, export_program, fuse_batchnorm
    from cora_onnx.onnx.int8 import activation_histograms, choose_scheme, integer_kernels
    from cora_onnx.core.modelfile import onnx_bytes
    from cora_onnx.onnx.pipeline import apply_plan
    from cora_onnx.torch.search import LayerSelection, RtnSettings, search_rtn
    from cora_onnx.torch.search.cora import CoraSettings, search_cora
    from cora_onnx.run.stages import integer_activations
    from cora_onnx.onnx.verify import fidelity, measure_latency, parity, predict_onnx, session, top1
    from cora_onnx.torch.verify import predict_torch

    torch.set_num_threads(args.threads)
    model, _, data = load(name, shared, calib=True)
    val, calib = data.val, data.calib.subset(args.calib_images, 0)
    fused = fuse_batchnorm(model)
    program = export_program(fused, 224)
    float_bytes = onnx_bytes(program.model)
    rows: dict[str, dict] = {"float": {"method": "float", "bytes": len(float_bytes)}}
    blobs = {"float": float_bytes}

    t0 = time.perf_counter()
    blobs["ort_static"] = ort_quantize_static(float_bytes, calib)
    rows["ort_static"] = {"method": "onnxruntime quantize_static (QDQ, u8 act, s8 per-channel, reduce_range, MinMax)",
                          "seconds": time.perf_counter() - t0}

    scheme = choose_scheme()
    sims = {}
    for weights in args.weights:
        for clip in (args.weight_clips if weights == "rtn" else ["mse"]):
            t0 = time.perf_counter()
            keep = LayerSelection(keep_bits=scheme.weight_bits)
            if weights == "rtn":
                plan = search_rtn(fused, RtnSettings(bits=scheme.weight_bits, clip=clip, selection=keep))
                what = f"RTN per-channel {clip}"
            else:  # CoRa's default preset without adapters: GPTQ rounding, bias tuning
                plan = search_cora(fused, CoraSettings(bits=scheme.weight_bits, budget=0.0, selection=keep), calib)
                what = "CoRa preset, no adapters (GPTQ, bias fine-tuning)"
            wq = apply_plan(export_program(fused, 224).model, plan)
            hists = activation_histograms(wq, calib, CalibSettings(), args.threads)  # one pass: every range method
            prep_s = time.perf_counter() - t0
            qmodel = apply_plan_torch(fused, plan)
            for method in args.calib_methods:  # activation QDQ as cora_onnx.quantize adds it
                key = f"cora_w{scheme.weight_bits}{weights if weights == 'cora' else clip}_a8{method}"
                blobs[key], sims[key], _, _ = integer_activations(
                    ir.serde.deserialize_model(ir.to_proto(wq)), program, qmodel, calib, scheme,
                    CalibSettings(method=method), args.threads, histograms=hists)
                rows[key] = {"method": f"cora-onnx W{scheme.weight_bits}A8: weights {what}, activations {method}",
                             "seconds": prep_s, "scheme": scheme.to_json()}

    if args.save_dir:  # keep the models, e.g. to re-time them later with `cora-onnx bench`
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        for k, b in blobs.items():
            (Path(args.save_dir) / f"{name}_{k}.onnx").write_bytes(b)
    sessions = {k: session(b, threads=args.threads) for k, b in blobs.items()}
    float_logits = None
    for k, s in sessions.items():
        logits = predict_onnx(s, val, 32, f"{name} {k}")
        float_logits = logits if float_logits is None else float_logits  # "float" comes first
        rows[k].update(top1=top1(logits, val.labels), bytes=len(blobs[k]), kernels=integer_kernels(blobs[k]),
                       fidelity=fidelity(logits, float_logits))
        if k in sims:  # parity with the PyTorch simulation on a subset
            sub = val.subset(args.parity_images, 0)
            par = parity(predict_onnx(s, sub, 32), predict_torch(sims[k], sub, 32, "PyTorch simulation"))
            rows[k]["parity_vs_pytorch_sim"] = par
        print(f"{name} {k}: top-1 {rows[k]['top1']:.2f}%  agreement with float {rows[k]['fidelity']['top1_agreement']:.1f}%  "
              f"KL {rows[k]['fidelity']['kl_divergence']:.4f}  {len(blobs[k]) / 1e6:.2f} MB  integer kernels "
              f"{rows[k]['kernels']['integer']}, float conv/gemm {rows[k]['kernels']['float_compute']}", flush=True)
    lat = measure_latency(sessions, (3, 224, 224), batch_sizes=tuple(args.batches), runs=args.runs, threads=args.threads)
    out = []
    for k, r in rows.items():
        r["model"] = name
        r["key"] = k
        for b in args.batches:
            r[f"latency_b{b}_ms"] = lat[k][f"batch_{b}"]["median_ms"]
            r[f"latency_b{b}_p10_p90"] = [lat[k][f"batch_{b}"]["p10_ms"], lat[k][f"batch_{b}"]["p90_ms"]]
            r[f"latency_b{b}_vs_float"] = lat[k][f"batch_{b}"]["median_ms"] / lat["float"][f"batch_{b}"]["median_ms"]
        out.append(r)
    return out


def table(rows: list[dict], batches) -> str:
    lines = ["| model | variant | top-1 (dev-val) | top-1 agreement with float | KL to float | size | " + " | ".join(
        f"batch-{b} latency (x float)" for b in batches) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in batches) + " |"]
    for r in rows:
        lat = " | ".join(f"{r[f'latency_b{b}_ms']:.1f} ms ({r[f'latency_b{b}_vs_float']:.2f}x)" for b in batches)
        fid = r["fidelity"]
        lines.append(f"| {r['model']} | {r['method']} | {r['top1']:.1f}% | {fid['top1_agreement']:.1f}% | "
                     f"{fid['kl_divergence']:.4f} | {r['bytes'] / 1e6:.2f} MB | {lat} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'cora-onnx[plot]'): no plot", file=sys.stderr)
        return False
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model):
            ax.scatter(r["latency_b1_ms"], r["top1"], s=max(r["bytes"] / 1e5, 10), alpha=0.6)
            ax.annotate(f"{r['key']} ({r['bytes'] / 1e6:.1f} MB)", (r["latency_b1_ms"], r["top1"]), fontsize=7)
        ax.set_title(f"{model}: top-1 vs batch-1 latency (marker area ~ file size)")
        ax.set_xlabel("batch-1 latency, ms (one interleaved run)")
        ax.set_ylabel("top-1 on dev-val, %")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_lite0"],
                    choices=["resnet18", "efficientnet_lite0"])
    ap.add_argument("--calib-images", type=int, default=1600)
    ap.add_argument("--calib-methods", nargs="+", default=["minmax"], choices=["minmax", "percentile", "mse"],
                    help="activation range methods (one calibration pass serves all)")
    ap.add_argument("--weights", nargs="+", default=["rtn", "cora"], choices=["rtn", "cora"],
                    help="weight grids: round to nearest, or CoRa's default preset without adapters")
    ap.add_argument("--weight-clips", nargs="+", default=["minmax"], choices=["minmax", "mse", "std"],
                    help="RTN weight range search(es)")
    ap.add_argument("--parity-images", type=int, default=100)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--save-dir", default=None, help="also write every model here as <model>_<row>.onnx")
    ap.add_argument("--table", nargs="+", default=None,
                    help="print the markdown table (and --plot) of saved --out file(s) and exit")
    args = ap.parse_args()
    if args.table:
        rows = [r for f in args.table for r in json.loads(Path(f).read_text())]
        print(table(rows, args.batches))
        if args.plot:
            plot(rows, Path(args.plot))
        return
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models:
        rows += run_model(name, Path(args.shared), args)
        if args.out:  # after each model, so a long run keeps what it has measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))
    print(table(rows, args.batches))
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    sys.exit(main())
