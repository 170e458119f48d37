"""Product-quantization figures for docs/results/pq.md (issue 4).

    python tools/measure_pq.py --model efficientnet_lite0 [--blocks small large] [--finetune-steps 100] [--out pq.json]
    python tools/measure_pq.py --model resnet18 [--blocks small large]
    python tools/measure_pq.py --model efficientnet_lite0 --blocks large --holdout [--no-finetune-last]
    python tools/measure_pq.py --model efficientnet_lite0 --blocks large --target float [--finetune-steps 0]

EfficientNet-Lite0: per block preset, search (progressive EM + distillation) -> ONNX with the
codebook-decoding subgraph -> ONNX Runtime top-1 on dev-val, file size and ratio to the float ONNX
file, size breakdown (codes, codebooks, biases, the rest), time to compress, batch-1 latency
(interleaved with float), parity with the PyTorch reference, and whether ORT constant-folds the
decoding subgraph at load (Gather nodes left in the optimized graph). --holdout: calibration and
fine-tuning see five of the ten classes, top-1 (float and PQ) is scored on the other five, so a
class prior learnt from the calibration images cannot raise it (the split of tools/holdout.py, the
same as tools/measure_cora.py --holdout). Every row also gives the fidelity to the float network on
the scored images (top-1 agreement and KL), which no class prior can raise.

--protocol sample (issue 15): calibrate on imagenette/calib (ten classes), score on
imagenet-sample/even (500 images of 500 other classes, 1000-way, its class_map.json) with
--crop-ratio 0.875 for every folder (the folders and helpers of tools/measure_cora.py --protocol
sample); primary figures top-1 agreement with the float model and mean KL(float || PQ), then
top-1 of both. Rows are levers (--levers), each a PqSettings override or several joined by '+';
every row goes through cora_onnx.quantize (export, ONNX Runtime on the sample, the parity gate,
file size):

    python tools/measure_pq.py --protocol sample --model efficientnet_lite0 --levers default ft0 \
        --latency-runs 0 --torch-threads 1 --out pq-sample.jsonl
    python tools/measure_pq.py --table pq-sample.jsonl

The --light mode (search and PyTorch scoring only, layer fits memoized by patching the search) was
removed in issue 27; the rows made with it in docs/results/pq.md name the commit that has it
(a42b714). The --protocol imagenette rows (per block preset) go through cora_onnx.quantize too.

ResNet-18 (../shared) is already product-quantized at small blocks (256 codewords per layer,
before BatchNorm): the un-fused model (BatchNorm kept) is searched with finetuning off and must
be reconstructed almost exactly (max/mean relative weight error, distinct sub-vectors per layer);
then the usual BN-fused pipeline at small and large blocks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from cora_onnx.core.options import parse_keep
from cora_onnx.torch.export import quantizable_layers
from cora_onnx.torch.models import build_model, default_normalization
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq
from holdout import holdout_dirs
from imagenette import emit, sample_paths, weights_path

# the uniform_layers of the "u3dw4" lever (EfficientNet-Lite0): blocks 0-5 8-bit, blocks 4-5's 1x1
# convs 4-bit, blocks 6-15's 1x1 convs 3-bit and depthwise convs 4-bit
_EARLY = "_blocks.[0-5].*,_blocks.[45]._expand_conv:4,_blocks.[45]._project_conv:4"
_U3DW4 = (_EARLY + ","
          "_blocks.[6-9]._expand_conv:3,_blocks.[6-9]._project_conv:3,"
          "_blocks.1[0-5]._expand_conv:3,_blocks.1[0-5]._project_conv:3,"
          "_blocks.[6-9]._depthwise_conv:4,_blocks.1[0-5]._depthwise_conv:4")

# issue 15 levers (--protocol sample): name -> PqSettings overrides ("selection" is a parse_keep
# string plus ":BITS"); '+' joins several, later ones win
LEVERS = {
    "default": {},
    "ft0": {"finetune_steps": 0},
    "fc-weight": {"weight_target_layers": "_fc"},                     # the classifier fitted to its float weight
    "head-weight": {"weight_target_layers": "_fc,_conv_head"},        # ... and the head conv                                     # no fine-tuning
    "stats256": {"stats_size": 256}, "stats-all": {"stats_size": 1 << 30},  # statistics images
    "no-feedback": {"error_feedback": False},
    "weight": {"target": "weight"},
    "cw": {"finetune_biases": False, "finetune_scales": False, "finetune_last": False},  # codewords only
    "mse": {"distill": "mse"},                                  # MSE on centred logits
    "flip": {"augment": "flip"}, "crop": {"augment": "crop"},
    "patches16": {"stats_patches": 16}, "patches32": {"stats_patches": 32}, "patches64": {"stats_patches": 64},
    "patches128": {"stats_patches": 128},
    "ft300": {"finetune_steps": 300},
    "keep-dw": {"selection": "first,depthwise:8"}, "keep-dw4": {"selection": "first,depthwise:4"},
    "large": {"blocks": "large"},
    # EfficientNet-Lite0 layouts: blocks 0-5 (83 k weights, where the inherited error builds up; their
    # 256-codeword codebooks cost more than 8-bit weights) on the uniform 8-bit grid, and
    "early8": {"uniform_layers": "_blocks.[0-5].*"},
    # 10x: blocks 6-11's 1x1 convs at d = 2 (4 bits per weight) ...
    "lite10": {"uniform_layers": "_blocks.[0-5].*",
               "block_size": "_blocks.[6-9]._expand_conv=2,_blocks.[6-9]._project_conv=2,"
                             "_blocks.1[01]._expand_conv=2,_blocks.1[01]._project_conv=2"},
    # ... or those 1x1 convs on a uniform 4-bit per-channel grid (the same 4 bits per weight),
    # GPTQ-rounded to the float target on the partially quantized network's inputs
    "lite10u4": {"uniform_layers": "_blocks.[0-5].*,_blocks.[6-9]._expand_conv:4,_blocks.[6-9]._project_conv:4,"
                                   "_blocks.1[01]._expand_conv:4,_blocks.1[01]._project_conv:4",
                 "uniform_rounding": "gptq"},
    # the uniform layers' grids as CoRa's default: per-channel range chosen by the layer-output error
    # (quantizers.input_weighted_clip) and GPTQ with act-order (add to a layout with uniform_rounding gptq)
    "oc": {"uniform_clip": "input", "uniform_act_order": True},
    # ... or every expand / project conv of blocks 6-15 (2.74 M weights) on a uniform 3-bit grid, GPTQ-rounded
    # (with "oc": CoRa's grid recipe); depthwise, head conv and classifier product-quantized (small blocks)
    "u3": {"uniform_layers": "_blocks.[0-5].*,_blocks.[6-9]._expand_conv:3,_blocks.[6-9]._project_conv:3,"
                             "_blocks.1[0-5]._expand_conv:3,_blocks.1[0-5]._project_conv:3",
           "uniform_rounding": "gptq"},
    # ... with _blocks.5._project_conv (19 k weights) at 4 bits instead of 8: u3's file is 5 kB over 10x
    "u3b": {"uniform_layers": "_blocks.[0-5].*,_blocks.5._project_conv:4,_blocks.[6-9]._expand_conv:3,"
                              "_blocks.[6-9]._project_conv:3,_blocks.1[0-5]._expand_conv:3,"
                              "_blocks.1[0-5]._project_conv:3",
            "uniform_rounding": "gptq"},
    # ... with blocks 6-15's depthwise convs on a uniform 4-bit grid (rounded to nearest) instead of
    # whole-kernel PQ (about the same bytes), paid for by blocks 4-5's 1x1 convs at 4 bits
    "u3dw4": {"uniform_layers": _U3DW4, "uniform_rounding": "gptq"},
    # ... spending the 24 kB u3dw4 leaves under 10x on 4 bits for the 3-bit 1x1 convs with the largest
    # relative output error per weight in the search log of u3dw4+oc+ft0+fc-weight (256 calibration
    # images): the project convs of blocks 6, 7 (0.045, 0.055; 38 k weights each) and 10 (0.044, 75 k),
    # the expand convs of blocks 8 and 7 (0.034, 0.028; 38 k each); 229 k weights, +21 kB (1.863 MB, 10.01x;
    # later entries win)
    "u3dw4p": {"uniform_layers": _U3DW4 + ",_blocks.[67]._project_conv:4,_blocks.10._project_conv:4,"
                                          "_blocks.[78]._expand_conv:4",
               "uniform_rounding": "gptq"},
    # ... or the five 38 k-weight 1x1 convs of blocks 6-8 with the largest errors: the project convs of
    # blocks 6-7 and the expand convs of blocks 6-8 (0.024-0.034); 192 k weights (1.859 MB, 10.04x)
    "u3dw4q": {"uniform_layers": _U3DW4 + ",_blocks.[67]._project_conv:4,_blocks.[678]._expand_conv:4",
               "uniform_rounding": "gptq"},
    # 15x (1,244,003 bytes): the 1x1 convs of blocks 6-15 on the 2-bit uniform grid (GPTQ) with the rest as
    # u3dw4 make a 1.505 MB file (12.4x), so one bit per weight has to go somewhere large: the classifier
    # (fitted to its float weight: add fc-weight) and the expand convs of blocks 12-15 (lowest 3-bit errors
    # of the late 1x1 convs in u3dw4's search log) at d = 8, blocks 6-15's other 1x1 convs and the head
    # conv at d = 4, depthwise convs of blocks 6-15 at 3 bits, blocks 0-5 as u3dw4 (1.235 MB, 15.1x)
    "lite15c": {"uniform_layers": _EARLY + ",_blocks.[6-9]._depthwise_conv:3,_blocks.1[0-5]._depthwise_conv:3",
                "block_size": "_fc=8,_blocks.1[2-5]._expand_conv=8", "uniform_rounding": "gptq"},
    # diagnostics of u3dw4 (over 10x): head conv (GPTQ) and classifier (its weight rounded to nearest) on the
    # 8-bit grid instead of PQ, or the
    # 1x1 convs of blocks 6-15 at 4 bits instead of 3
    "u3dw4-hf8": {"uniform_layers": "_blocks.[0-5].*,_blocks.[45]._expand_conv:4,_blocks.[45]._project_conv:4,"
                                    "_blocks.[6-9]._expand_conv:3,_blocks.[6-9]._project_conv:3,"
                                    "_blocks.1[0-5]._expand_conv:3,_blocks.1[0-5]._project_conv:3,"
                                    "_blocks.[6-9]._depthwise_conv:4,_blocks.1[0-5]._depthwise_conv:4,"
                                    "_conv_head:8",
                  "uniform_rounding": "gptq", "selection": "first,last:8"},  # the classifier rounded to nearest
    "u4dw4": {"uniform_layers": "_blocks.[0-5].*,_blocks.[45]._expand_conv:4,_blocks.[45]._project_conv:4,"
                                "_blocks.[6-9]._expand_conv:4,_blocks.[6-9]._project_conv:4,"
                                "_blocks.1[0-5]._expand_conv:4,_blocks.1[0-5]._project_conv:4,"
                                "_blocks.[6-9]._depthwise_conv:4,_blocks.1[0-5]._depthwise_conv:4",
              "uniform_rounding": "gptq"},
    # ... the same at 4 bits (over the 10x budget: how much the 3-bit grid costs)
    "u4": {"uniform_layers": "_blocks.[0-5].*,_blocks.[6-9]._expand_conv:4,_blocks.[6-9]._project_conv:4,"
                             "_blocks.1[0-5]._expand_conv:4,_blocks.1[0-5]._project_conv:4",
           "uniform_rounding": "gptq"},
    # ... and the project convs of blocks 12-14 at d = 2 too, paid for by the classifier at d = 8
    "lite10b": {"uniform_layers": "_blocks.[0-5].*",
                "block_size": "_blocks.[6-9]._expand_conv=2,_blocks.[6-9]._project_conv=2,"
                              "_blocks.1[01]._expand_conv=2,_blocks.1[01]._project_conv=2,"
                              "_blocks.1[234]._project_conv=2,_fc=8"},
    # ... 15x: the classifier at d = 16 and the head conv at d = 8 pay for the uniform early blocks
    "lite15": {"uniform_layers": "_blocks.[0-5].*", "block_size": "_fc=16,_conv_head=8"},
    # ... or with every late layer at d = 8 instead of the classifier at d = 16
    "lite15b": {"uniform_layers": "_blocks.[0-5].*",
                "block_size": "_fc=8,_conv_head=8,_blocks.15._project_conv=8,_blocks.15._expand_conv=8"},
}


def lever_options(name: str) -> dict:
    kw: dict = {}
    for atom in name.split("+"):
        if atom.startswith("bs:"):  # bs:<block_size spec>, e.g. bs:_fc=16
            kw["block_size"] = atom[3:]
        elif atom.startswith("budget:"):  # budget:<ratio> (per-layer block sizes under a byte budget)
            kw["budget"] = float(atom[7:])
        elif atom.startswith("seed:"):  # seed:<n> (statistics images, codebook initialisation): run-to-run spread
            kw["seed"] = int(atom[5:])
        elif atom in LEVERS:
            kw.update(LEVERS[atom])
        else:
            raise SystemExit(f"unknown lever {atom!r}; choose from {', '.join(LEVERS)}, bs:SPEC, budget:X, seed:N "
                             "(join with +)")
    return kw


def pq_settings_kw(kw: dict) -> dict:
    """A lever's overrides as PqSettings keywords: the selection string -> LayerSelection."""
    kw = dict(kw)
    sel = kw.pop("selection", None)
    if sel is not None:
        keep, _, bits = sel.partition(":")
        kw["selection"] = LayerSelection(keep=parse_keep(keep), keep_bits=int(bits or 8))
    return kw


def run_sample(args) -> None:
    """--protocol sample: every row through cora_onnx.quantize (ONNX Runtime scores the sample
    against the float PyTorch model; the parity gate holds)."""
    import resource

    from cora_onnx import quantize

    paths = sample_paths(args.shared)
    mean, std = default_normalization(args.model)
    for lever in args.levers:
        kw = lever_options(lever)
        if args.calib_size_sample is not None:
            kw.setdefault("calib_size", args.calib_size_sample)
        rec = {"protocol": "sample", "model": args.model, "lever": lever, "options": kw, "light": False,
               "crop_ratio": args.crop_ratio, "torch_threads": args.torch_threads}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = quantize(build_model(args.model, weights_path(args.model, args.shared)), calib=paths["calib"],
                           val=paths["sample"], class_map=paths["sample_map"], method="pq", out=Path(tmp) / "m.onnx",
                           mean=mean, std=std, crop_ratio=args.crop_ratio, model_name=args.model,
                           latency_runs=args.latency_runs, threads=args.torch_threads, **pq_settings_kw(kw))
            quantize_seconds = time.perf_counter() - t0  # search, export, ONNX Runtime checks and scoring
        r = res.report  # ONNX Runtime on the sample vs the float PyTorch model
        rec.update(scored_by="onnxruntime", search_seconds=r["search_seconds"], quantize_seconds=quantize_seconds,
                   peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, parity=r["parity"],
                   onnx_bytes=r["onnx_bytes"], float_onnx_bytes=r["float_onnx_bytes"], sample_images=r["images"]["val"],
                   fidelity_to_float=r["fidelity_to_float"], top1=r["top1"]["quantized_onnxruntime"],
                   float_top1=r["top1"]["float"], finetune=r.get("pq", {}).get("finetune", {}),
                   ratio=r["float_onnx_bytes"] / r["onnx_bytes"], environment=r["environment"])
        emit(args.out, rec, ("lever", "fidelity_to_float", "top1", "onnx_bytes", "ratio", "search_seconds"))


def sample_table(path: str) -> None:
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| model | lever | run | agreement with float | KL | top-1 / float (sample) | ONNX file | vs float | "
          "search s |")
    print("|" + " --- |" * 9)
    for r in recs:
        if r.get("protocol") != "sample":
            continue
        f = r["fidelity_to_float"]
        print(f"| {r['model']} | {r['lever']} | {'light' if r['light'] else 'full (ORT)'} | "
              f"{f['top1_agreement']:.1f}% | {f['kl_divergence']:.3f} | {r['top1']:.1f}% / {r['float_top1']:.1f}% | "
              f"{r['onnx_bytes'] / 1e6:.3f} MB | {r['ratio']:.2f}x | {r['search_seconds']:.0f} |")


def file_breakdown(blob: bytes) -> dict:
    """Bytes of the file by role: PQ codes, codebooks (codewords + channel scales), biases, the rest."""
    proto = onnx.load_from_string(blob)
    out = {"total": len(blob), "codes": 0, "codebooks": 0, "biases": 0, "uniform_weights": 0, "float_weights": 0}
    for t in proto.graph.initializer:
        n = len(t.raw_data) if t.raw_data else t.ByteSize()
        if t.name.endswith("_codes"):
            out["codes"] += n
        elif t.name.endswith(("_codewords", "_codescale")):
            out["codebooks"] += n
        elif t.name.endswith((".bias", ".bias_corrected")):
            out["biases"] += n
        elif t.name.endswith(("_quantized", "_scale", "_zero_point")):
            out["uniform_weights"] += n
        elif len(t.dims) >= 2:
            out["float_weights"] += n
    out["rest"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def ort_folds_decode(blob: bytes) -> dict:
    """Does ORT's optimizer (ORT_ENABLE_ALL) constant-fold the decoding subgraph at load?"""
    from cora_onnx.onnx.verify import optimized_graph

    t0 = time.perf_counter()
    opt = optimized_graph(blob)
    load_s = time.perf_counter() - t0
    before = [n.op_type for n in onnx.load_from_string(blob).graph.node]
    after = [n.op_type for n in opt.graph.node]
    return {"gather_before": before.count("Gather"), "gather_after_optimization": after.count("Gather"),
            "session_load_s": load_s}


def row_of(name: str, res, seconds: float) -> dict:
    """A preset row from a cora_onnx.quantize result: ONNX Runtime top-1 (and PyTorch's, and the
    float model's), parity, fidelity to float, size, the file's breakdown, load-time folding, latency."""
    r = res.report
    blob = Path(res.onnx_path).read_bytes()
    lat = r.get("latency_ms") or {}
    return {"name": name, "top1_ort": r["top1"]["quantized_onnxruntime"], "top1_torch": r["top1"]["quantized_torch"],
            "float_top1_ort": r["top1"]["float"], "onnx_bytes": r["onnx_bytes"], "ratio": r["compression_ratio"],
            **{k: r["parity"][k] for k in ("top1_agreement", "max_abs_error")}, "verified": r["verified"],
            "fidelity_to_float": r["fidelity_to_float"], "breakdown": file_breakdown(blob),
            "ort_decode": ort_folds_decode(blob), "latency_float_ms": lat.get("float"), "latency_pq_ms": lat.get("quantized"),
            "compress_s": r["search_seconds"], "quantize_s": seconds}


def resnet_reconstruction(model, settings: PqSettings, calib) -> dict:
    """Search the un-fused ResNet-18 (its conv weights are the published PQ ones) and compare."""
    plan = search_pq(model, settings, calib)
    layers = quantizable_layers(model)
    per = []
    for lp in plan.layers:
        if lp.codebook is None:
            continue
        w = layers[lp.name].weight.detach().numpy()
        w_hat = lp.codebook.decode(lp.shape)
        sub = w.reshape(w.shape[0], -1, lp.codebook.block_size).reshape(-1, lp.codebook.block_size)
        per.append({"name": lp.name, "block_size": lp.codebook.block_size,
                    "distinct_subvectors": int(np.unique(sub, axis=0).shape[0]),
                    "codewords": int(lp.codebook.codewords.shape[0]),
                    "relative_error": float(np.linalg.norm(w_hat - w) / np.linalg.norm(w)),
                    "max_abs_error_over_max_abs": float(np.abs(w_hat - w).max() / np.abs(w).max())})
    return {"plan": plan, "layers": per}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    ap.add_argument("--model", default="efficientnet_lite0", choices=["resnet18", "efficientnet_lite0"])
    ap.add_argument("--blocks", nargs="*", default=["small", "large"], choices=["small", "large"],
                    help="block presets to run (none: ResNet-18 reconstruction check only)")
    ap.add_argument("--codewords", type=int, default=256)
    ap.add_argument("--em-iters", type=int, default=20)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--keep", default="first", help="layers kept on a uniform grid: first,last,depthwise or none")
    ap.add_argument("--keep-bits", type=int, default=8, help="bits of the kept layers")
    ap.add_argument("--block-size", default="", help="per-kind or per-layer (fnmatch pattern) block sizes overriding the preset, e.g. linear=16,_conv_head=8")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--target", default="float", choices=["weight", "float"],
                    help="fit each layer to its own float weight or to the float network's output of the layer")
    ap.add_argument("--stats-size", type=int, default=64)
    ap.add_argument("--finetune-biases", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--finetune-last", action=argparse.BooleanOptionalAction, default=True,
                    help="fine-tune the classifier (the last PQ layer)")
    ap.add_argument("--holdout", action="store_true",
                    help="calibrate and fine-tune on the calib images of five classes only and score float and PQ "
                         "on the dev-val images of the other five (tools/holdout.py)")
    ap.add_argument("--skip-reconstruction", action="store_true", help="ResNet-18: skip the un-fused check")
    ap.add_argument("--protocol", default="imagenette", choices=["imagenette", "sample"],
                    help="imagenette: the preset rows above; sample: calibrate on the ten classes, score on "
                    "imagenet-sample/even (issue 15), one row per --levers entry")
    ap.add_argument("--levers", nargs="+", default=["default"],
                    help=f"(--protocol sample) rows: {', '.join(LEVERS)}, bs:SPEC, budget:X, seed:N, joined by +")
    ap.add_argument("--calib-size-sample", type=int, default=None,
                    help="(--protocol sample) calibration images [PqSettings default]")
    ap.add_argument("--crop-ratio", type=float, default=0.875, help="(--protocol sample) for every folder [0.875]")
    ap.add_argument("--table", default=None, help="print the markdown table of a --protocol sample JSON-lines file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.table:
        sample_table(args.table)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("cora_onnx.torch.search.pq").setLevel(logging.INFO)
    logging.getLogger("cora_onnx.torch.search.staged").setLevel(logging.INFO)
    torch.set_num_threads(args.torch_threads)
    if args.protocol == "sample":
        run_sample(args)
        return
    from cora_onnx import quantize

    shared = Path(args.shared)
    weights = weights_path(args.model, shared)
    mean, std = default_normalization(args.model)
    data = shared / "data/imagenette"
    result: dict = {"model": args.model, "args": vars(args), "rows": []}
    selection = LayerSelection(keep=parse_keep(args.keep), keep_bits=args.keep_bits)
    with tempfile.TemporaryDirectory() as tmp:
        calib_dir, val_dir, split = holdout_dirs(data, Path(tmp)) if args.holdout else \
            (data / "calib", data / "dev-val", None)
        if split:
            result["holdout"] = split
            print(f"held-out classes: calibration on {split['calib_classes']}, dev-val of {split['val_classes']}",
                  flush=True)
        if args.model == "resnet18" and not args.skip_reconstruction:
            from cora_onnx.run.stages import load_data, load_model
            from cora_onnx.onnx.data import Preprocess

            model = load_model(args.model, weights)
            calib = load_data(model, Preprocess(224, 1.0, mean, std), calib=calib_dir).calib
            st = PqSettings(blocks="small", codewords=args.codewords, em_iters=args.em_iters, finetune_steps=0,
                            calib_size=args.calib_size, target="weight", bias_correction=False, channel_scale=False,
                            error_feedback=False, selection=LayerSelection(keep=()))
            t0 = time.perf_counter()
            rec = resnet_reconstruction(model, st, calib)
            secs = time.perf_counter() - t0
            errs = np.array([r["relative_error"] for r in rec["layers"]])
            result["reconstruction"] = {"layers": rec["layers"], "max_relative_error": float(errs.max()),
                                        "mean_relative_error": float(errs.mean()), "seconds": secs,
                                        "layers_within_1e-5": int((errs <= 1e-5).sum())}
            print(f"ResNet-18 un-fused, small blocks, no fine-tuning: relative weight error max {errs.max():.2e} "
                  f"mean {errs.mean():.2e} over {len(errs)} layers, {int((errs <= 1e-5).sum())} within 1e-5 "
                  f"({secs:.0f} s)", flush=True)
            for r in rec["layers"]:
                print(f"  {r['name']:<24} d={r['block_size']:<3} distinct {r['distinct_subvectors']:>6}  "
                      f"k={r['codewords']:<4} rel.err {r['relative_error']:.2e}", flush=True)
        for blocks in args.blocks:
            options = dict(blocks=blocks, block_size=args.block_size, codewords=args.codewords, em_iters=args.em_iters,
                           finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, calib_size=args.calib_size,
                           finetune_biases=args.finetune_biases, finetune_last=args.finetune_last, selection=selection,
                           target=args.target, stats_size=args.stats_size)
            t0 = time.perf_counter()
            res = quantize(build_model(args.model, weights), calib=calib_dir, val=val_dir,
                           class_map=data / "class_map.json", method="pq", out=Path(tmp) / f"{blocks}.onnx", mean=mean,
                           std=std, model_name=args.model, latency_runs=args.latency_runs, threads=args.torch_threads,
                           **options)
            row = {"blocks": blocks, "block_size": args.block_size, **row_of(blocks, res, time.perf_counter() - t0)}
            row["finetune"] = res.report.get("pq", {}).get("finetune", {})
            row["layers"] = [{"name": lp.name, **{k: v for k, v in lp.info.items()
                                                  if "error" in k or k == "relative_weight_mse"}} for lp in res.plan.layers]
            result["rows"].append(row)
            b, fid = row["breakdown"], row["fidelity_to_float"]
            print(f"{blocks}{' ' + args.block_size if args.block_size else ''}: ORT top-1 {row['top1_ort']:.2f}% "
                  f"(float {row['float_top1_ort']:.2f}%; agreement with float {fid['top1_agreement']:.1f}%, KL "
                  f"{fid['kl_divergence']:.3f}; torch {row['top1_torch']:.2f}%, agree {row['top1_agreement']:.1f}%, "
                  f"max|dlogit| {row['max_abs_error']:.1e})  {row['onnx_bytes'] / 1e6:.3f} MB ({row['ratio']:.1f}x)  "
                  f"search {row['compress_s']:.0f} s  latency {row['latency_float_ms'] or 0:.1f} -> "
                  f"{row['latency_pq_ms'] or 0:.1f} ms  | codes {b['codes'] / 1e3:.0f} kB, codebooks "
                  f"{b['codebooks'] / 1e3:.0f} kB, biases {b['biases'] / 1e3:.0f} kB, uniform "
                  f"{b['uniform_weights'] / 1e3:.0f} kB, rest {b['rest'] / 1e3:.0f} kB | ORT Gather nodes "
                  f"{row['ort_decode']['gather_before']} -> {row['ort_decode']['gather_after_optimization']} after load",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
