"""CoRa figures for docs/results/cora.md (issue 3): float | RTN | CoRa reference preset | CoRa default, and the
ablation from the reference preset to the default one step at a time. Every row runs the product
path (`cora_onnx.quantize`: search -> export -> ONNX Runtime top-1, parity gate, size, latency) on the
../shared images (calib 1,600, dev-val 1,000) and is appended to a JSON-lines file; `--table`
prints the markdown tables from that file.

    python tools/measure_cora.py --model resnet18 --bits 4 3 --configs rtn reference default --out cora.jsonl
    python tools/measure_cora.py --model resnet18 --bits 3 --configs ablation --iters 100 --out cora.jsonl
    python tools/measure_cora.py --holdout --model resnet18 --bits 3 --iters 30 --calib-size 400 --out cora.jsonl
    python tools/measure_cora.py --table cora.jsonl

--holdout (tools/holdout.py): calibrate on the calib images of five classes and score on the dev-val
images of the other five, float on the same images, to see gains that are class-prior effects.

--protocol sample (issue 14): calibrate on imagenette/calib (ten classes), score on
imagenet-sample/even (500 images of 500 other classes, 1000-way, its class_map.json) with
--crop-ratio 0.875 for every folder, as the CLI applies it; primary figures agreement with the float
model and mean KL(float || compressed), then top-1 of both; --devval adds dev-val top-1 (1,000
images, same preprocessing; `cora-onnx eval` of the quantized and the float file). Rows are levers
(--levers), each a CoraSettings override or several joined by '+':

    python tools/measure_cora.py --protocol sample --bits 4 --levers default mse crop mse+crop \
        --calib-size 400 --iters 60 --latency-runs 0 --torch-threads 1 --out sample.jsonl
    python tools/measure_cora.py --protocol sample --bits 4 3 --levers default --devval \
        --torch-threads 1 --out sample.jsonl

The --light mode (search and PyTorch scoring only, with statistics memoized by patching the
search) was removed in issue 27: tools score what users get, through the library's stages. Rows
made with it in docs/results/ name the commit that has it (a42b714).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from holdout import holdout_dirs
from imagenette import emit, sample_paths, weights_path

ABLATION = [  # cumulative: each row adds one change to the row above
    ("reference", {"preset": "reference"}),
    ("+ per-channel MSE grid", {"preset": "reference", "per_channel": True, "symmetric": True, "clip": "mse"}),
    ("+ statistics correction", {"preset": "reference", "per_channel": True, "symmetric": True, "clip": "mse",
                                 "stats": "float"}),
    ("+ GPTQ rounding", {"preset": "reference", "per_channel": True, "symmetric": True, "clip": "mse",
                         "stats": "float", "rounding": "gptq"}),
    ("+ input-metric SVD", {"preset": "reference", "per_channel": True, "symmetric": True, "clip": "mse",
                            "stats": "float", "rounding": "gptq", "svd": "activation"}),
    ("+ adapter fine-tuning", {"preset": "default", "stats": "float"}),
    ("- statistics correction (= default)", {"preset": "default"}),
]
CONFIGS = {"rtn": ("rtn", {}), "reference": ("cora", {"preset": "reference"}), "default": ("cora", {"preset": "default"}),
           "no-adapters": ("cora", {"preset": "default", "budget": 0.0}),
           "default-fixed-classifier": ("cora", {"preset": "default", "fit_classifier": False}),
           "default-no-stats": ("cora", {"preset": "default", "stats": "none"}),  # = default since 2026-11-23
           "default-float-stats": ("cora", {"preset": "default", "stats": "float"}),  # the default before
           "default-mean-stats": ("cora", {"preset": "default", "stats": "mean"}),
           # 8-bit integer activations (issue 5), adapters fused into the integer weights at load; the
           # report also times the same model without adapters and with them as branch convolutions
           "default-a8": ("cora", {"preset": "default", "act_bits": 8, "act_calib": "minmax"})}

# issue 14 levers (--protocol sample): name -> CoraSettings overrides; '+' joins several
LEVERS = {"default": {}, "reference": {"preset": "reference"},
          "no-adapters": {"budget": 0.0},
          "fixed-classifier": {"fit_classifier": False},   # no statistics/bias change on the classifier
          "no-bias": {"finetune_biases": False},              # fine-tune adapter factors only
          "mse": {"distill": "mse"}, "kl": {"distill": "kl"},                     # all logits count the same
          "features": {"features": "layers"},               # every planned layer's output matched
          "flip": {"augment": "flip"}, "crop": {"augment": "crop"}, "mix": {"augment": "mix"},
          "stats-float": {"stats": "float"}, "stats-mean": {"stats": "mean"},  # statistics alignment
          "iters250": {"iters": 250, "finetune_iters": 100},
          # GPTQ on full-rank input statistics (stats.py): sequential groups, act-order, output-error clip
          "seq4": {"gptq_passes": 4, "mixed_bits": ()}, "seq8": {"gptq_passes": 8, "mixed_bits": ()}, "act-order": {"act_order": True},
          "no-act-order": {"act_order": False},
          "clip-weight": {"clip_metric": "weight"},
          "clip-input": {"clip_metric": "input"}, "rows2": {"cov_rows": 2.0},
          "ft0": {"finetune_iters": 0},                        # every step on the rank search
          "ft20": {"finetune_iters": 20}, "iters60": {"iters": 60, "finetune_iters": 20},
          "nearest": {"rounding": "nearest"}, "damp0.1": {"gptq_damp": 0.1}, "damp1": {"gptq_damp": 1.0},
          "damp0.03": {"gptq_damp": 0.03}, "damp0.001": {"gptq_damp": 0.001},
          "adapter4": {"adapter_bits": 4}, "adapter8": {"adapter_bits": 8},
          "budget3": {"budget": 0.03},
          # per-layer widths under the bytes of uniform --bits (cora_onnx/search/cora/mixed.py)
          # ("mixed" = the default preset since 2026-12-02; "uniform": one width, the default before)
          "mixed": {"mixed_bits": (2, 3, 4, 8)}, "uniform": {"mixed_bits": ()},
          "g32": {"group_size": 32}, "g64": {"group_size": 64}, "g128": {"group_size": 128},  # group-wise scales
          "gains": {"finetune_gains": True},          # per-channel gains trained in the fine-tuning
          "a8": {"act_bits": 8, "act_calib": "minmax"},  # full rows only: 8-bit activations, adapters fused
          "a8mse": {"act_bits": 8, "act_calib": "mse"},  # ... activation ranges of least 8-bit error
          "a8pct": {"act_bits": 8, "act_calib": "percentile"}}


def lever_options(name: str) -> dict:
    kw: dict = {}
    for atom in name.split("+"):
        if atom.startswith("mb:"):  # mb:<bits per weight>: --mixed-budget (per-layer widths under those bytes)
            kw["mixed_budget"] = float(atom[3:])
        elif atom in LEVERS:
            kw.update(LEVERS[atom])
        else:
            raise SystemExit(f"unknown lever {atom!r}; choose from {', '.join(LEVERS)}, mb:BITS (join with +)")
    return kw


def _lever_kw(args, lever: str) -> dict:
    return _step_options(args, lever_options(lever))


def _step_options(args, kw: dict) -> dict:
    """--iters / --finetune-iters / --budget on top of a row's CoRa options (kw, changed in place)."""
    if args.iters is not None:
        kw["iters"] = args.iters
        if args.finetune_iters is not None:
            kw["finetune_iters"] = args.finetune_iters
    if args.budget is not None:
        kw.setdefault("budget", args.budget)
    return kw


def run_sample(args) -> None:
    """--protocol sample: every row through cora_onnx.quantize (ONNX Runtime scores the sample
    against the float PyTorch model; the parity gate holds); with --devval, `cora_onnx.onnx.evaluate`
    scores the quantized and the float file on dev-val."""
    from cora_onnx import quantize
    from cora_onnx.onnx.evaluate import evaluate
    from cora_onnx.torch.models import build_model, default_normalization

    paths = sample_paths(args.shared)
    mean, std = default_normalization(args.model)
    for bits in args.bits:
        for lever in args.levers:
            kw = _lever_kw(args, lever)
            if args.calib_size is not None:
                kw.setdefault("calib_size", args.calib_size)
            rec = {"protocol": "sample", "model": args.model, "lever": lever, "bits": bits, "options": kw,
                   "light": False, "crop_ratio": args.crop_ratio, "torch_threads": args.torch_threads}
            with tempfile.TemporaryDirectory() as tmp:
                res = quantize(build_model(args.model, weights_path(args.model, args.shared)), calib=paths["calib"],
                               val=paths["sample"], class_map=paths["sample_map"], bits=bits, method="cora",
                               out=Path(tmp) / "m.onnx", float_out=Path(tmp) / "f.onnx", mean=mean, std=std,
                               crop_ratio=args.crop_ratio, model_name=args.model, latency_runs=args.latency_runs, **kw)
                dev = {}
                if args.devval:
                    for key, path in (("devval", res.onnx_path), ("float_devval", Path(tmp) / "f.onnx")):
                        e = evaluate(path, paths["devval"], paths["devval_map"], threads=args.torch_threads)
                        dev[f"{key}_top1"], dev["devval_images"] = e["top1"], e["images"]
            r = res.report  # ONNX Runtime on the sample vs the float PyTorch model
            rec.update(scored_by="onnxruntime", search_seconds=r["search_seconds"], parity=r["parity"],
                       onnx_bytes=r["onnx_bytes"], effective_bits=r["effective_bits"], sample_images=r["images"]["val"],
                       cora={k: v for k, v in r.get("cora", {}).items() if k not in ("loss_history", "ranks")},
                       fidelity_to_float=r["fidelity_to_float"], top1=r["top1"]["quantized_onnxruntime"],
                       float_top1=r["top1"]["float"], devval_top1=dev.get("devval_top1"),
                       float_devval_top1=dev.get("float_devval_top1"), devval_images=dev.get("devval_images", 0),
                       environment=r["environment"])
            emit(args.out, rec, ("lever", "bits", "fidelity_to_float", "top1", "devval_top1", "search_seconds"))


def sample_table(recs: list[dict]) -> None:
    rows = []
    for r in recs:
        f, c = r["fidelity_to_float"], r.get("cora") or {}
        dev = f"{r['devval_top1']:.1f}% / {r['float_devval_top1']:.1f}%" if r.get("devval_top1") is not None else "-"
        rows.append([r["model"], r["lever"], f"W{r['bits']}", "light" if r["light"] else "full (ORT)",
                     f"{f['top1_agreement']:.1f}%", f"{f['kl_divergence']:.3f}",
                     f"{r['top1']:.1f}% / {r['float_top1']:.1f}%", dev, str(c.get("iterations", "-")),
                     f"{100 * c['adapter_fraction']:.2f}%" if c else "-", f"{r['search_seconds']:.0f}"])
    print("| model | lever | bits | run | agreement with float | KL | top-1 / float (sample) | dev-val top-1 / float "
          "| steps | adapters (% weights) | search s |")
    print("|" + " --- |" * 11)
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def run(args) -> None:
    from cora_onnx import quantize
    from cora_onnx.torch.models import build_model, default_normalization

    shared = Path(args.shared)
    weights = weights_path(args.model, shared)
    mean, std = default_normalization(args.model)
    data = shared / "data/imagenette"
    holdout_tmp = tempfile.TemporaryDirectory() if args.holdout else None
    calib_dir, val_dir, split = holdout_dirs(data, Path(holdout_tmp.name)) if args.holdout else \
        (data / "calib", data / "dev-val", None)
    rows = []
    for cfg in args.configs:
        if cfg == "ablation":
            rows += [(f"ablation: {name}", "cora", dict(kw)) for name, kw in ABLATION]
        else:
            method, kw = CONFIGS[cfg]
            rows.append((cfg, method, dict(kw)))
    for bits in args.bits:
        for name, method, kw in rows:
            if method == "cora":
                _step_options(args, kw)
                if args.calib_size is not None:
                    kw.setdefault("calib_size", args.calib_size)
            model = build_model(args.model, weights)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = quantize(model, calib=calib_dir, val=val_dir, class_map=data / "class_map.json", bits=bits, method=method,
                               out=Path(tmp) / "m.onnx", mean=mean, std=std, model_name=args.model,
                               latency_runs=args.latency_runs, **kw)
                wall = time.perf_counter() - t0
            r = res.report
            rec = {"model": args.model, "config": name, "bits": bits, "options": kw, "top1": r["top1"],
                   "parity": r["parity"], "fidelity_to_float": r.get("fidelity_to_float"), "onnx_bytes": r["onnx_bytes"], "float_onnx_bytes": r["float_onnx_bytes"],
                   "effective_bits": r["effective_bits"], "search_seconds": r["search_seconds"], "wall_seconds": wall,
                   "latency_ms": r["latency_ms"], "cora": {k: v for k, v in r.get("cora", {}).items() if k != "loss_history"},
                   "environment": r["environment"], "torch_threads": args.torch_threads,
                   **({"holdout": split} if split else {})}
            print(json.dumps({k: rec[k] for k in ("config", "bits", "top1", "effective_bits", "search_seconds")}), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


def _fid(r: dict) -> str:
    f = r.get("fidelity_to_float")
    return f"{f['top1_agreement']:.1f}% / {f['kl_divergence']:.3f}" if f else "-"


def _markdown(header: list[str], rows: list[list[str]]) -> None:
    """Print a markdown table; the 'agreement with float' column only when some row has it."""
    col = header.index("agreement with float / KL")
    if all(r[col] == "-" for r in rows):
        header, rows = header[:col] + header[col + 1:], [r[:col] + r[col + 1:] for r in rows]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def table(path: str) -> None:
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    sample = [r for r in recs if r.get("protocol") == "sample"]
    if sample:
        sample_table(sample)
    recs = [r for r in recs if r.get("protocol") != "sample"]
    light = [r for r in recs if r.get("light")]
    recs = [r for r in recs if not r.get("light")]
    held = lambda r: " (held-out classes)" if r.get("holdout") else ""  # noqa: E731
    if light:
        _markdown(["model", "ablation row", "bits", "top-1 PyTorch", "float", "agreement with float / KL", "iterations",
                   "adapters (% weights)", "search s"],
                  [[r["model"], r["config"][len("ablation: "):] + held(r), f"W{r['bits']}", f"{r['top1_torch']:.1f}%",
                    f"{r['float_top1_torch']:.1f}%", _fid(r), str(r["cora"]["iterations"]),
                    f"{100 * r['cora']['adapter_fraction']:.2f}%", f"{r['search_seconds']:.0f}"] for r in light])
        print()
    if not recs:
        return
    rows = []
    for r in recs:
        c, lat = r.get("cora") or {}, r["latency_ms"]
        rows.append([r["model"], r["config"] + held(r), f"W{r['bits']}", f"{r['top1']['quantized_onnxruntime']:.1f}%",
                     f"{r['top1']['float']:.1f}%", _fid(r), f"{r['parity']['top1_agreement']:.1f}%",
                     f"{r['onnx_bytes'] / 1e6:.2f} MB", f"{r['effective_bits']:.2f}", str(c.get("iterations", "-")),
                     f"{100 * c['adapter_fraction']:.2f}%" if c else "-", f"{r['search_seconds']:.0f}",
                     " / ".join(f"{lat[k]:.1f}" if lat.get(k) is not None else "-"
                                for k in ("float", "quantized", "quantized_no_adapters", "quantized_branches"))])
    _markdown(["model", "config", "bits", "top-1 ORT", "float", "agreement with float / KL", "ORT=PyTorch", "ONNX file",
               "effective bits", "iterations", "adapters (% weights)", "search s",
               "latency b1 ms: float / quantized / without adapters / adapters as branch convs"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "efficientnet_lite0"])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--configs", nargs="+", default=["rtn", "reference", "default"],
                    choices=[*CONFIGS, "ablation"])
    ap.add_argument("--iters", type=int, default=None, help="override CoRa's iterations (all rows)")
    ap.add_argument("--finetune-iters", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--latency-runs", type=int, default=10)
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for the search "
                    "(1 avoids OpenMP spin contention when the machine is shared)")
    ap.add_argument("--calib-size", type=int, default=None, help="CoRa calibration images [the preset's: 1600]")
    ap.add_argument("--holdout", action="store_true", help="calibrate on five classes, score on the other five "
                    "(tools/holdout.py)")
    ap.add_argument("--protocol", default="imagenette", choices=["imagenette", "sample"],
                    help="imagenette: calib and dev-val of the ten classes (--holdout: five and five); sample: "
                    "calib on the ten classes, score on imagenet-sample/even (issue 14)")
    ap.add_argument("--levers", nargs="+", default=["default"],
                    help=f"(--protocol sample) rows: {', '.join(LEVERS)}, mb:BITS (--mixed-budget), or several "
                    "joined by +")
    ap.add_argument("--crop-ratio", type=float, default=0.875, help="(--protocol sample) for every folder [0.875]")
    ap.add_argument("--devval", action="store_true", help="(--protocol sample) also dev-val top-1 (1,000 images)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--table", default=None, help="print the markdown table from this JSON-lines file and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    for name in ("cora_onnx.onnx.verify", "onnxscript", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.protocol == "sample":
        run_sample(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
