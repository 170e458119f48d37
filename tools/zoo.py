"""Every torchvision ConvNet through `cora-onnx quantize` (issue 25): architecture x method, each
run as the CLI a user would type, with random weights whose BatchNorm statistics are measured on
real images (cora_onnx.torch.models.measure_batchnorm: no pretrained weights can be downloaded
here). Records per run the exit code, "verified", the seconds (search and whole command), the
file ratio, the peak RSS of the command and its error line, appends them to a JSON-lines file
(runs already there are not run again) and writes the markdown table.

    python tools/zoo.py --representatives --torch-threads 1 --jsonl zoo.jsonl --out docs/results/zoo.md
    python tools/zoo.py --archs resnet18,convnext_tiny --methods rtn-w4,a8 --jsonl zoo.jsonl
    python tools/zoo.py --table zoo.jsonl --out docs/results/zoo.md      # the table only

Without --archs / --representatives: every ConvNet classifier of torchvision (the families below,
all sizes). Methods: rtn-w4 (`--method rtn --bits 4`), a8 (`--bits 8 --act-bits 8`), cora-w4
(`--method cora --bits 4`), pq (`--method pq`), each with default settings. Images from ../shared:
--calib-images of imagenette/calib (BatchNorm statistics on the first 64 of them too) and
--val-images classes of imagenet-sample/even (parity, agreement), at the architecture's own
input size (inception_v3 299, others 224) unless --input-size is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

FAMILIES = {  # family -> (architectures, representative)
    "resnet": (("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"), "resnet18"),
    "resnext": (("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"), "resnext50_32x4d"),
    "wide_resnet": (("wide_resnet50_2", "wide_resnet101_2"), "wide_resnet50_2"),
    "densenet": (("densenet121", "densenet161", "densenet169", "densenet201"), "densenet121"),
    "inception": (("inception_v3",), "inception_v3"),
    "googlenet": (("googlenet",), "googlenet"),
    "mobilenet_v2": (("mobilenet_v2",), "mobilenet_v2"),
    "mobilenet_v3": (("mobilenet_v3_large", "mobilenet_v3_small"), "mobilenet_v3_large"),
    "efficientnet": (tuple(f"efficientnet_b{i}" for i in range(8)), "efficientnet_b0"),
    "efficientnet_v2": (("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"), "efficientnet_v2_s"),
    "regnet_x": (("regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
                  "regnet_x_16gf", "regnet_x_32gf"), "regnet_x_400mf"),
    "regnet_y": (("regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
                  "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf"), "regnet_y_400mf"),
    "convnext": (("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"), "convnext_tiny"),
    "shufflenet": (("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
                   "shufflenet_v2_x1_0"),
    "squeezenet": (("squeezenet1_0", "squeezenet1_1"), "squeezenet1_0"),
    "mnasnet": (("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"), "mnasnet1_0"),
    "vgg": (("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"), "vgg11_bn"),
    "alexnet": (("alexnet",), "alexnet"),
}
METHODS = {
    "rtn-w4": ["--method", "rtn", "--bits", "4"],
    "a8": ["--method", "rtn", "--bits", "8", "--act-bits", "8"],
    "cora-w4": ["--method", "cora", "--bits", "4"],
    "pq": ["--method", "pq"],
}
BN_IMAGES = 64


def _family(arch: str) -> str:
    return next((f for f, (archs, _) in FAMILIES.items() if arch in archs), "?")


def _link_subset(src: Path, dst: Path, n: int, per_class_dirs: bool, seed: int = 0) -> Path:
    """A folder of symbolic links to n images of src (flat), or to n of its class folders."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if per_class_dirs:
        items = sorted(p for p in src.iterdir() if p.is_dir())
        for p in sorted(rng.sample(items, min(n, len(items)))):
            (dst / p.name).symlink_to(p)
    else:
        items = sorted(p for p in src.glob("*/*") if p.is_file())
        for p in sorted(rng.sample(items, min(n, len(items)))):
            (dst / f"{p.parent.name}_{p.name}").symlink_to(p)
    return dst


def bn_measured_weights(arch: str, input_size: int, calib: Path, out: Path, threads: int) -> None:
    """The architecture with random weights (seed 0) and BatchNorm statistics measured on 64
    calibration images, saved as a state_dict."""
    import torch

    from cora_onnx.onnx.data import Preprocess, load_images
    from cora_onnx.torch.models import build_model, default_normalization, measure_batchnorm

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(arch)
    images = load_images(calib, Preprocess(input_size, 1.0, *default_normalization(arch))).subset(BN_IMAGES)
    measure_batchnorm(model, (torch.from_numpy(b) for b in images.batches(16)))
    torch.save(model.state_dict(), out)


def _run(cmd: list[str], env: dict, log_path: Path, label: str, timeout: float) -> tuple[int | None, float, int]:
    """Run cmd with its output to log_path; (exit code or None on timeout, wall s, peak RSS bytes).
    A line every 30 s while it runs."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        last = t0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter()
            if pid:
                code = os.waitstatus_to_exitcode(status)
                proc.returncode = code
                return code, now - t0, int(usage.ru_maxrss) * 1024
            if now - t0 > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                return None, now - t0, int(usage.ru_maxrss) * 1024
            if now - last >= 30:
                tail = _last_line(log_path)
                print(f"  {label}: running {now - t0:.0f} s; {tail[:120]}", flush=True)
                last = now
            time.sleep(1.0)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _error_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1]
    tb = [ln for ln in lines if ln and not ln.startswith(("[cora-onnx]", "File ", "^"))]
    return tb[-1] if tb else ""


def run_one(arch: str, method: str, args, work: Path, calib: Path, val: Path) -> dict:
    from cora_onnx.torch.models import default_input_size

    size = args.input_size or default_input_size(arch)
    weights = work / f"{arch}-{size}.pt"
    if not weights.exists():
        bn_measured_weights(arch, size, calib, weights, args.torch_threads)
    out, report = work / f"{arch}-{method}.onnx", work / f"{arch}-{method}.json"
    cmd = [sys.executable, "-m", "cora_onnx", "quantize", "--model", arch, "--weights", str(weights),
           "--input-size", str(size), "--calib", str(calib), "--val", str(val), "--latency-runs", "0",
           "--threads", str(args.threads), "--out", str(out), "--report", str(report), *METHODS[method]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else []))}
    log_path = work / f"{arch}-{method}.log"
    print(f"{arch} {method}: {shlex.join(cmd[1:])}", flush=True)
    code, seconds, rss = _run(cmd, env, log_path, f"{arch} {method}", args.timeout)
    text = log_path.read_text(errors="replace")
    rec = {"arch": arch, "family": _family(arch), "method": method, "input_size": size, "exit": code,
           "commit": _commit(),
           "seconds": round(seconds, 1), "peak_rss_mb": round(rss / 2**20), "searched": "search done in" in text}
    if report.exists():
        r = json.loads(report.read_text())
        fid = r.get("fidelity_to_float") or {}
        kernels = (r.get("activations") or {}).get("onnxruntime_kernels") or {}
        rec.update(verified=bool(r.get("verified")), ratio=r.get("compression_ratio"),
                   integer_kernels=kernels.get("integer"), float_kernels=kernels.get("float_compute"),
                   search_seconds=r.get("search_seconds"), agreement=fid.get("top1_agreement"),
                   kl=fid.get("kl_divergence"))
    else:
        rec["verified"] = False
    if code != 0:
        rec["error"] = "timeout" if code is None else _error_line(log_path)
    for p in (out, report):
        p.unlink(missing_ok=True)
    for p in work.glob(f"{arch}-{method}.failed.*"):
        p.unlink()
    print(f"{arch} {method}: exit {code}, verified {rec['verified']}, {seconds:.0f} s, "
          f"peak RSS {rec['peak_rss_mb']} MB {rec.get('error', '')}", flush=True)
    return rec


def _kernels(r: dict) -> str:
    if r.get("integer_kernels") is None:
        return "-"
    return f"{r['integer_kernels']} / {r.get('float_kernels', 0)}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(records: list[dict], command: str) -> str:
    latest = {}
    for r in records:
        latest[(r["arch"], r["method"])] = r
    commands = list(dict.fromkeys(r.get("command", command) for r in latest.values())) or [command]
    command = "\n".join(f"# ({i}) {c}" if len(commands) > 1 else c for i, c in enumerate(commands, 1))
    archs = sorted({a for a, _ in latest}, key=lambda a: (list(FAMILIES).index(_family(a)) if _family(a) in FAMILIES
                                                          else 99, a))
    lines = ["# The torchvision ConvNet zoo through `cora-onnx quantize`", "",
             "Commands (from the repository root, on a 2-core machine; the torch and ONNX Runtime threads are "
             "those of each command; seconds are wall time with nothing else running unless the notes below say "
             "otherwise):", "",
             "```", command, "```", "",
             "Random weights (seed 0) with BatchNorm statistics measured on 64 real calibration images "
             "(cora_onnx.torch.models.measure_batchnorm), so logits have their normal size. Methods with default "
             "settings: rtn W4 (`--method rtn --bits 4`), A8 (`--method rtn --bits 8 --act-bits 8`), cora W4 "
             "(`--method cora --bits 4`), pq (`--method pq`). Each cell: exit code, verified (ONNX Runtime against "
             "PyTorch), file ratio (float ONNX / quantized ONNX), seconds of the whole command (search seconds in "
             "brackets), peak RSS. Agreement with the float model on random weights says little and is not shown; "
             "refusals give their one-line reason below the table.", "",
             "| family | architecture | input | method | exit | verified | ratio | seconds (search) | peak RSS | "
             "integer / float kernels (A8) | commit | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for a in archs:
        for m in METHODS:
            r = latest.get((a, m))
            if r is None:
                continue
            exit_ = "timeout" if r["exit"] is None else str(r["exit"])
            lines.append(f"| {r['family']} | {a} | {r['input_size']} | {m} | {exit_} | "
                         f"{'yes' if r.get('verified') else 'no'} | {_fmt(r.get('ratio'), '.2f')}x | "
                         f"{r['seconds']:.0f} ({_fmt(r.get('search_seconds'), '.0f')}) | {r['peak_rss_mb']} MB | "
                         f"{_kernels(r)} | {r.get('commit', '-')} | "
                         f"({commands.index(r.get('command', commands[0])) + 1 if r.get('command') in commands else 1}) |")
            if r.get("error"):
                when = "after the search" if r.get("searched") else "before any search"
                notes.append(f"- {a} {m} (exit {exit_}, {when}): `{r['error'][:300]}`")
    missing = [f for f, (archs_, _) in FAMILIES.items() if not any(a in archs_ for a in archs)]
    if missing:
        lines += ["", f"Families without a row yet: {', '.join(missing)}."]
    if notes:
        lines += ["", "Refusals and failures:", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=None, help="comma-separated architectures [every family, all sizes]")
    ap.add_argument("--representatives", action="store_true", help="one architecture per family")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--input-size", type=int, default=None, help="override every architecture's input size")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--val-images", type=int, default=100, help="classes of imagenet-sample/even, one image each")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run before it is stopped")
    ap.add_argument("--jsonl", type=Path, default=Path("zoo.jsonl"), help="results, appended; runs found there are skipped")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--table", type=Path, nargs="+", default=None,
                    help="only write the table from these JSON-lines files")
    args = ap.parse_args()
    command = "python tools/zoo.py " + shlex.join(sys.argv[1:])
    if args.table is not None:
        records = [json.loads(ln) for t in args.table for ln in t.read_text().splitlines() if ln.strip()]
        text = table(records, records[0].get("command", command) if records else command)
        if args.out:
            args.out.write_text(text)
        print(text)
        return
    if args.archs:
        archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    elif args.representatives:
        archs = [rep for _, rep in FAMILIES.values()]
    else:
        archs = [a for archs_, _ in FAMILIES.values() for a in archs_]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"unknown method {bad[0]!r}; expected some of {', '.join(METHODS)}")
    done = set()
    if args.jsonl.exists():
        done = {(r["arch"], r["method"]) for r in map(json.loads, args.jsonl.read_text().splitlines()) if r}
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="cora-zoo-") as tmp:
        work = Path(tmp)
        calib = _link_subset(SHARED / "data/imagenette/calib", work / "calib", args.calib_images, False)
        val = _link_subset(SHARED / "data/imagenet-sample/even", work / "val", args.val_images, True)
        for arch in archs:
            for method in methods:
                if (arch, method) in done:
                    continue
                rec = run_one(arch, method, args, work, calib, val)
                rec["command"] = command
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            for p in work.glob(f"{arch}-*.pt"):
                p.unlink()
    records = [json.loads(ln) for ln in args.jsonl.read_text().splitlines() if ln.strip()]
    text = table(records, command)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
