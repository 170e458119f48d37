"""Where the resident memory of a `cora-onnx` command goes (issue 25: vgg11_bn pq at 14 GB).

    OMP_NUM_THREADS=1 python tools/rss_profile.py --out rss.json -- quantize --model vgg11_bn --weights w.pt \
        --calib calib --val val --method pq --latency-runs 0 --threads 1 --out vgg.onnx

Runs the command line in this process (as `python -m cora_onnx ARGS` would) with a sampling thread
that reads the resident set size (/proc/self/statm) every --interval seconds. Every log line of the
`cora_onnx` logger is printed with the seconds since the start, the RSS at that moment and the
highest RSS since the previous line, so a phase's (a layer's) peak is on the line that ends it.
Each time the RSS rises --step MB above the highest stack recorded so far, the main thread's stack
(its innermost cora_onnx frames) is kept: the summary lists those rises, and where the peak was
reached. torch storage is invisible to tracemalloc; the RSS is not. Linux only (/proc).

A proxy of VGG's wide classifier without the rest of VGG (search_pq alone, default settings but
--pq-set, on --calib images): Conv(3, 512, 3, stride 4) -> ReLU -> AdaptiveAvgPool(POOL) ->
Linear(512 POOL^2, C_OUT) -> ReLU -> Linear(C_OUT, 10), the conv kept on the uniform grid:

    OMP_NUM_THREADS=1 python tools/rss_profile.py --pq-wide 5 --c-out 4096 --calib calib [--pq-set finetune_steps=0]

POOL 7 and C_OUT 4096 are VGG's classifier.0 (K = 25,088); POOL 5 (K = 12,800) costs about a
quarter of its K x K memory and half of its C_OUT x K.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _where(frame, depth: int) -> list[str]:
    """The innermost `depth` frames of the project (cora_onnx, passes), innermost last."""
    ours = [f for f in traceback.extract_stack(frame)
            if "/cora_onnx/" in f.filename or "/passes/" in f.filename]
    return [f"{Path(f.filename).relative_to(ROOT) if f.filename.startswith(str(ROOT)) else f.filename}:{f.lineno} "
            f"{f.name}" for f in ours[-depth:]]


class Sampler:
    """RSS every `interval` s; the main thread's stack at every rise of `step` bytes."""

    def __init__(self, interval: float, step: int, depth: int) -> None:
        self.interval, self.step, self.depth = interval, step, depth
        self.t0 = time.monotonic()
        self.peak = self.since_line = rss()
        self.rises: list[dict] = []
        self.lines: list[dict] = []
        self._level = 0  # the RSS of the last stack kept, lowered with the RSS (a rise from a low is kept)
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss sampler", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        now = rss()
        self.since_line = max(self.since_line, now)
        self.peak = max(self.peak, now)
        self._level = min(self._level, now)
        if now >= self._level + self.step:
            self._level = now
            frame = sys._current_frames().get(self._main)
            self.rises.append({"t": round(time.monotonic() - self.t0, 2), "rss_mb": round(now / MB),
                               "stack": _where(frame, self.depth) if frame is not None else []})
        return now

    def line(self, message: str) -> str:
        now = self.sample()
        rec = {"t": round(time.monotonic() - self.t0, 2), "rss_mb": round(now / MB),
               "peak_since_mb": round(self.since_line / MB), "message": message}
        self.lines.append(rec)
        self.since_line = now
        return f"[{rec['t']:8.1f} s  rss {rec['rss_mb']:6d} MB  max {rec['peak_since_mb']:6d} MB] {message}"


class _Handler(logging.Handler):
    def __init__(self, sampler: Sampler) -> None:
        super().__init__()
        self.sampler = sampler

    def emit(self, record: logging.LogRecord) -> None:
        print(self.sampler.line(record.getMessage()[:220]), file=sys.stderr, flush=True)


def pq_wide(pool: int, c_out: int, calib: Path, sets: list[str], holdout: Path | None = None) -> None:
    """search_pq on the proxy of the module doc; each searched layer's output error against the
    float network on the calibration images and on `holdout`'s."""
    import torch
    from torch import nn

    from cora_onnx.onnx.data import Preprocess, load_images
    from cora_onnx.torch.search.pq import PqSettings, search_pq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 512, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(pool),
                          nn.Flatten(), nn.Linear(512 * pool * pool, c_out), nn.ReLU(), nn.Linear(c_out, 10)).eval()
    over = {}
    for item in sets:
        key, _, value = item.partition("=")
        over[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    images = load_images(calib, Preprocess(224))
    plan = search_pq(model, PqSettings(**over), images)
    from cora_onnx.torch.export import apply_plan_torch

    quant = apply_plan_torch(model, plan)
    sets_ = {"calib": images, **({"holdout": load_images(holdout, Preprocess(224))} if holdout else {})}
    outputs = {}
    with torch.no_grad():  # each layer's output, float and quantized network
        for which, imgs in sets_.items():
            x = torch.from_numpy(next(imgs.batches(len(imgs))))
            for net, tag in ((model, "float"), (quant, "pq")):
                def keep(_m, _i, out, key):
                    outputs[key] = out
                hooks = [m.register_forward_hook(functools.partial(keep, key=(n, (which, tag))))
                         for n, m in net.named_children() if n in ("4", "6")]
                net(x)
                for h in hooks:
                    h.remove()
    for lp in plan.layers:
        msg = f"{lp.name}: activation-weighted error {lp.info.get('activation_weighted_error')}, relative weight " \
              f"MSE {lp.info['relative_weight_mse']:.5f}"
        for which in sets_:
            if (lp.name, (which, "pq")) in outputs:
                yf, yq = outputs[(lp.name, (which, "float"))], outputs[(lp.name, (which, "pq"))]
                spread = (yf - yf.mean(0)).pow(2).sum()  # about each output's mean: the bias carries the rest
                msg += f", output error / float spread on {which} {float((yq - yf).pow(2).sum() / spread):.6f}"
        logging.getLogger("cora_onnx").info(msg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between two RSS samples")
    ap.add_argument("--step", type=float, default=200, help="MB of rise between two recorded stacks")
    ap.add_argument("--depth", type=int, default=4, help="project frames kept per stack")
    ap.add_argument("--out", type=Path, default=None, help="JSON with every log line and every recorded rise")
    ap.add_argument("--pq-wide", type=int, default=None, metavar="POOL", help="the VGG classifier proxy (module doc)")
    ap.add_argument("--c-out", type=int, default=4096, help="outputs of the proxy's wide layer")
    ap.add_argument("--calib", type=Path, default=None, help="calibration images of the proxy")
    ap.add_argument("--holdout", type=Path, default=None, help="images the proxy's output errors are also measured on")
    ap.add_argument("--pq-set", action="append", default=[], metavar="KEY=VALUE", help="a PqSettings field (proxy)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the cora-onnx command line")
    args = ap.parse_args()
    cli = args.args[1:] if args.args[:1] == ["--"] else args.args
    sys.path.insert(0, str(ROOT))
    from cora_onnx.cli import main as cli_main

    sampler = Sampler(args.interval, int(args.step * MB), args.depth)
    setup = cli_main._setup_logging

    def patched(verbose, quiet):  # the CLI's own handler replaced by the annotating one
        setup(verbose, quiet)
        logging.getLogger("cora_onnx").handlers[:] = [_Handler(sampler)]

    cli_main._setup_logging = patched
    code = 0
    if args.pq_wide is not None:
        patched(0, False)
    with sampler:
        try:
            if args.pq_wide is not None:
                pq_wide(args.pq_wide, args.c_out, args.calib, args.pq_set, args.holdout)
            else:
                cli_main.main(cli, standalone_mode=False)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the kernel's, between samples too
    print(f"\nexit {code}, peak RSS {sampler.peak / MB:.0f} MB sampled ({maxrss / MB:.0f} MB ru_maxrss), "
          f"{time.monotonic() - sampler.t0:.0f} s", file=sys.stderr)
    print("rises to a new high (RSS when the stack was taken, innermost project frame last; every rise in --out):",
          file=sys.stderr)
    high = 0
    for r in sampler.rises:
        if r["rss_mb"] > high:
            high = r["rss_mb"]
            print(f"  {r['t']:8.1f} s {r['rss_mb']:6d} MB  {' > '.join(r['stack'][-2:])}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"argv": cli, "exit": code, "peak_rss_mb": round(sampler.peak / MB),
                                        "ru_maxrss_mb": round(maxrss / MB), "lines": sampler.lines,
                                        "rises": sampler.rises}, indent=1))
    sys.exit(code)


if __name__ == "__main__":
    main()
