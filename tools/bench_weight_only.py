"""Weight-only ResNet-18 files in a plain ONNX Runtime session: each weight layout against float.

Makes (in --dir) the float BN-fused ResNet-18 (../shared weights) and, for every weight-only
variant, the same plan written in both weight layouts:

- rtn W4, W3, W2 (round to nearest, no data needed; made here);
- each `--plan NAME=PLAN` given (e.g. CoRa plans saved by `cora-onnx quantize --plan-out`), with
  the adapters merged into the weights at load (the default of the decode layout) and, for
  comparison, as branch convolutions.

Then times all of them in one interleaved run, each in a plain session as a user's application
makes it: `onnxruntime.InferenceSession(path, so)` where `so` sets only intra_op_num_threads
(--threads, 2 by default), batch 1 and batch 8, --runs rounds. Prints a markdown table (file size,
median and p10-p90 per batch, ratio to float), whether ONNX Runtime's optimized graph of each file
is the float model's (same op counts), and the CPU features found. Latency on a shared machine is
noisy: compare ratios within one run.

    python tools/bench_weight_only.py --dir DIR --plan cora-w4=DIR/r18-cora-w4-plan --runs 200

The CoRa plans of docs/onnxruntime.md came from
    cora-onnx quantize --model resnet18 --weights ../shared/models/resnet18-imagenet.pt --method cora \\
        --bits 4 --calib ../shared/data/imagenette/calib --val ../shared/data/imagenet-sample/even \\
        --crop-ratio 0.875 --latency-runs 0 --out DIR/cora-w4.onnx --plan-out DIR/cora-w4-plan
(and --bits 3, --bits 2).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(args) -> dict[str, Path]:
    """Write the files; returns label -> path, float first."""
    import onnx_ir as ir
    import torch
    import torchvision

    from cora_onnx.core.modelfile import onnx_bytes
    from cora_onnx.core.plan import Plan
    from cora_onnx.onnx.pipeline import apply_plan
    from cora_onnx.torch.export import export_onnx, fuse_batchnorm
    from cora_onnx.torch.search import RtnSettings, search_rtn

    torch.set_num_threads(args.torch_threads)
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(args.shared / "models" / "resnet18-imagenet.pt", weights_only=True))
    fused = fuse_batchnorm(model.eval(), 224)
    exported = export_onnx(fused, 224)
    files: dict[str, Path] = {}

    def write(label: str, data: bytes) -> None:
        path = args.dir / f"{label}.onnx"
        path.write_bytes(data)
        files[label] = path
        print(f"  wrote {path} ({len(data):,} B)", flush=True)

    def copy():
        return ir.from_proto(ir.to_proto(exported))

    write("float", onnx_bytes(exported))
    plans = {f"rtn-w{b}": search_rtn(fused, RtnSettings(bits=b)) for b in args.rtn_bits}
    plans.update({name: Plan.load(path) for name, path in (p.split("=", 1) for p in args.plan)})
    for name, plan in plans.items():
        write(f"{name}-decode", onnx_bytes(apply_plan(copy(), plan, weight_layout="decode")))
        write(f"{name}-qdq", onnx_bytes(apply_plan(copy(), plan, weight_layout="qdq")))
        if any(lp.adapter is not None for lp in plan.layers):
            write(f"{name}-decode-branch", onnx_bytes(apply_plan(copy(), plan, weight_layout="decode",
                                                                 adapter_layout="branch")))
    return files


def same_graph_as_float(files: dict[str, Path]) -> dict[str, bool]:
    from cora_onnx.onnx.verify import optimized_graph

    counts = {k: collections.Counter(n.op_type for n in optimized_graph(p.read_bytes()).graph.node)
              for k, p in files.items()}
    return {k: c == counts["float"] for k, c in counts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--plan", action="append", default=[], metavar="NAME=PLAN", help="a saved plan to write and time")
    ap.add_argument("--rtn-bits", type=int, nargs="*", default=[4, 3, 2])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, action="append", default=None, help="batch sizes [1 and 8]")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="time the .onnx files already in --dir (float.onnx first)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort

    from cora_onnx.onnx.report import describe_cpu
    from cora_onnx.onnx.verify import measure_latency

    args.dir.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        files = {"float": args.dir / "float.onnx", **{p.stem: p for p in sorted(args.dir.glob("*.onnx"))
                                                      if p.stem != "float"}}
    else:
        files = build(args)
    same = same_graph_as_float(files)
    sessions = {}
    for k, p in files.items():  # a plain session: only the thread count is set
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        sessions[k] = ort.InferenceSession(str(p), so)
    batches = tuple(args.batch or (1, 8))
    t0 = time.perf_counter()
    lat = measure_latency(sessions, (3, 224, 224), batch_sizes=batches, warmup=args.warmup, runs=args.runs,
                          threads=args.threads)
    print(f"\n{len(files)} files, {args.runs} interleaved rounds per batch size, {args.threads} intra-op threads, "
          f"plain InferenceSession; {time.perf_counter() - t0:.0f} s; onnxruntime {ort.__version__}; "
          f"cpu: {describe_cpu()}\n")
    head = "| file | bytes | optimized graph = float's | " + " | ".join(
        f"batch {b} median ms (p10-p90) | x float" for b in batches) + " |"
    print(head)
    print("|" + " --- |" * (3 + 2 * len(batches)))
    for k, p in files.items():
        cells = []
        for b in batches:
            t, f = lat[k][f"batch_{b}"], lat["float"][f"batch_{b}"]
            cells += [f"{t['median_ms']:.2f} ({t['p10_ms']:.2f}-{t['p90_ms']:.2f})", f"{t['median_ms'] / f['median_ms']:.3f}"]
        print(f"| {k} | {p.stat().st_size:,} | {'yes' if same[k] else 'no'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
