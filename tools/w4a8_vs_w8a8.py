"""ResNet-18 W8A8 on the many-class protocol, and a 4-bit CoRa file with 8-bit activations against it.

Runs exactly the two CLI commands behind the W8A8 parity figure (docs/verification.md) and the
W4A8-vs-W8A8 size and latency figures (docs/results/cora.md):

    cora-onnx quantize --model resnet18 --weights ../shared/models/resnet18-imagenet.pt \
        --calib ../shared/data/imagenette/calib --val ../shared/data/imagenet-sample/even \
        --crop-ratio 0.875 --bits 8 --act-bits 8 --out DIR/w8a8.onnx --report DIR/w8a8.json --latency-runs 0
    cora-onnx bench DIR/w8a8.onnx W4A8.onnx --batch 1 --runs 60

W4A8 is the `cora-w4-a8-b0.05/model.onnx` of the ResNet-18 sweep
(`cora-onnx sweep tools/sweeps/resnet18_protocol.toml --out SWEEP`).

    python tools/w4a8_vs_w8a8.py --w4a8 SWEEP/cora-w4-a8-b0.05/model.onnx --dir DIR
or, with --make-w4a8, the W4A8 file is made first by the current default preset:
    cora-onnx quantize --model resnet18 --weights ../shared/models/resnet18-imagenet.pt --method cora \
        --bits 4 --act-bits 8 --calib ../shared/data/imagenette/calib --val ../shared/data/imagenet-sample/even \
        --crop-ratio 0.875 --latency-runs 0 --out DIR/w4a8.onnx --report DIR/w4a8.json
    python tools/w4a8_vs_w8a8.py --make-w4a8 --dir DIR
    python tools/w4a8_vs_w8a8.py --make-w4a8 --w4a8-options "--mixed-bits 2,3,4,8" --runs 200 --dir DIR

The quantize step prints ORT-vs-simulation parity and fidelity to float; a parity failure keeps
the model as DIR/w8a8.failed.onnx (exit 3), and the bench then uses that file.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w4a8", type=Path, help="the sweep's CoRa W4 + A8 ONNX file")
    ap.add_argument("--make-w4a8", action="store_true", help="make DIR/w4a8.onnx with the default CoRa preset first")
    ap.add_argument("--dir", type=Path, required=True, help="folder for the W8A8 file and its report")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the bench [all cores]")
    ap.add_argument("--w4a8-options", default="", help="(--make-w4a8) more quantize options, e.g. '--mixed-bits 2,3,4,8'")
    ap.add_argument("--reuse-w8a8", action="store_true", help="keep DIR/w8a8.onnx if it is there (it is deterministic)")
    args = ap.parse_args()
    if (args.w4a8 is None) == (not args.make_w4a8):
        ap.error("give either --w4a8 FILE or --make-w4a8")
    args.dir.mkdir(parents=True, exist_ok=True)
    w8a8 = args.dir / "w8a8.onnx"
    data = args.shared / "data"
    common = ["--model", "resnet18", "--weights", str(args.shared / "models/resnet18-imagenet.pt"),
              "--calib", str(data / "imagenette/calib"), "--val", str(data / "imagenet-sample/even"),
              "--crop-ratio", "0.875", "--act-bits", "8", "--latency-runs", "0"]
    if args.make_w4a8:
        args.w4a8 = args.dir / "w4a8.onnx"
        rc = subprocess.call(["cora-onnx", "quantize", *common, "--method", "cora", "--bits", "4",
                              *shlex.split(args.w4a8_options),
                              "--out", str(args.w4a8), "--report", str(args.dir / "w4a8.json")])
        if rc != 0:
            return rc
    rc = 0 if args.reuse_w8a8 and w8a8.exists() else \
        subprocess.call(["cora-onnx", "quantize", *common, "--bits", "8", "--out", str(w8a8),
                         "--report", str(args.dir / "w8a8.json")])
    if rc not in (0, 3):
        return rc
    if rc == 3:
        w8a8 = args.dir / "w8a8.failed.onnx"
    print(f"files: W8A8 {w8a8.stat().st_size:,} B, W4A8 {args.w4a8.stat().st_size:,} B "
          f"({args.w4a8.stat().st_size / w8a8.stat().st_size:.3f}x)", flush=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    return subprocess.call(["cora-onnx", "bench", str(w8a8), str(args.w4a8), "--batch", "1", "--runs", str(args.runs),
                            *threads])


if __name__ == "__main__":
    sys.exit(main())
