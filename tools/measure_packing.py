"""File sizes of packed sub-4-bit grids (issue 14, item 4): ResNet-18 from ../shared, RTN at W4,
W3 and W2 (weight-only) and W3 with --act-bits 8, each through the `cora-onnx quantize` command
line. Prints the commands it runs and a table: file bytes, ratio to the W4 file, file bits per
weight, parity, top-1 on dev-val, integer kernels, and whether ONNX Runtime's optimized graph
still has decoding nodes (it should not: they are constant-folded at load).

    python tools/measure_packing.py [--shared ../shared] [--out-dir /tmp/cora-packing] [--runs w4 w3 w2 w3a8]
                                    [--val-per-class N] [--calib-per-class N]

--val-per-class / --calib-per-class N: use the first N images (sorted) of each class folder, as
symlinks under --out-dir (0 = the whole folder), to keep the run short on a shared machine; file
sizes do not depend on it.

Single-threaded (OMP_NUM_THREADS=1, --threads 1) to share the machine; --latency-runs 0 is not
allowed by the CLI, so one timed run each (latency figures from this script mean nothing).
The --val folder has WordNet-id class folders: no --class-map needed (built-in ImageNet map).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import onnx

DECODE_OPS = {"Gather", "Mod", "Div", "MatMul", "Cast", "Slice"}


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    """src itself, or dst with symlinks to the first per_class images of each class folder."""
    if per_class <= 0:
        return src
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(p for p in cls.iterdir() if p.is_file())[:per_class]:
            link = dst / cls.name / img.name
            if not link.exists():
                link.symlink_to(img.resolve())
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    ap.add_argument("--out-dir", default="/tmp/cora-packing")
    ap.add_argument("--runs", nargs="+", default=["w4", "w3", "w2", "w3a8"],
                    choices=["w4", "w3", "w2", "w4a8", "w3a8", "w2a8"])
    ap.add_argument("--val-per-class", type=int, default=0)
    ap.add_argument("--calib-per-class", type=int, default=0)
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val = _subset(shared / "data/imagenette/dev-val", out / "val-subset", args.val_per_class)
    calib = _subset(shared / "data/imagenette/calib", out / "calib-subset", args.calib_per_class)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base = [sys.executable, "-m", "cora_onnx.cli.main", "quantize", "--model", "resnet18",
            "--weights", str(shared / "models/resnet18-imagenet.pt"), "--calib", str(calib),
            "--val", str(val), "--method", "rtn", "--latency-runs", "1",
            "--threads", "1", "-q"]
    rows = {}
    for name in args.runs:
        bits = int(name[1])
        cmd = base + ["--bits", str(bits), "--out", str(out / f"{name}.onnx"), "--report", str(out / f"{name}.json")]
        if name.endswith("a8"):
            cmd += ["--act-bits", "8"]
        print("$ OMP_NUM_THREADS=1 " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        r = json.loads((out / f"{name}.json").read_text())
        from cora_onnx.onnx.verify import optimized_graph

        blob = (out / f"{name}.onnx").read_bytes()
        proto = onnx.load_from_string(blob)
        packed = sum(t.name.endswith("_quantized_packed") for t in proto.graph.initializer)
        left = sum(n.op_type in DECODE_OPS and n.name.endswith(tuple(f"_quantized_{o}" for o in DECODE_OPS))
                   for n in optimized_graph(blob).graph.node)
        act = r.get("activations") or {}
        rows[name] = {"bytes": r["onnx_bytes"], "file_bits_per_weight": r["file_bits_per_weight"],
                      "parity": r["parity"]["top1_agreement"], "max_abs": r["parity"]["max_abs_error"],
                      "top1_float": r["top1"]["float"], "top1_ort": r["top1"]["quantized_onnxruntime"],
                      "agreement_float": r["fidelity_to_float"]["top1_agreement"],
                      "packed_layers": packed, "decode_nodes_after_load": left,
                      "qlinearconv": act.get("onnxruntime_kernels", {}).get("ops", {}).get("QLinearConv"),
                      "integer_kernels": act.get("onnxruntime_kernels", {}).get("integer"),
                      "float_compute": act.get("onnxruntime_kernels", {}).get("float_compute")}
    w4 = rows.get("w4", {}).get("bytes")
    print(f"\n{'run':6} {'bytes':>10} {'x W4':>6} {'bits/w':>7} {'parity':>7} {'top-1':>7} {'agree':>7} "
          f"{'packed':>6} {'left':>4} {'QLinConv':>8}")
    for name, r in rows.items():
        ratio = f"{r['bytes'] / w4:.3f}" if w4 else "-"
        print(f"{name:6} {r['bytes']:>10} {ratio:>6} {r['file_bits_per_weight']:7.3f} {r['parity']:6.2f}% "
              f"{r['top1_ort']:6.2f}% {r['agreement_float']:6.2f}% {r['packed_layers']:>6} "
              f"{r['decode_nodes_after_load']:>4} {r['qlinearconv'] if r['qlinearconv'] is not None else '-':>8}")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
