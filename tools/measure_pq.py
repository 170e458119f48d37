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
--light runs the search and scores the PyTorch model (ablation rows), without it every row goes
through cora_onnx.quantize (export, ONNX Runtime on the sample, parity, file size):

    python tools/measure_pq.py --protocol sample --light --model efficientnet_lite0 \
        --levers default ft0 stats-all --torch-threads 1 --out pq-sample.jsonl
    python tools/measure_pq.py --protocol sample --model efficientnet_lite0 --levers default \
        --torch-threads 1 --out pq-sample.jsonl                               # ONNX Runtime
    python tools/measure_pq.py --table pq-sample.jsonl

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

from cora_onnx.onnx.data import Preprocess, load_class_map, load_images
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes, quantizable_layers
from cora_onnx.torch.models import build_model, default_normalization
from cora_onnx.core.options import parse_keep
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq
from cora_onnx.onnx.verify import fidelity, measure_latency, parity, predict_onnx, session, top1
from cora_onnx.torch.verify import predict_torch
from holdout import holdout_dirs
from measure_cora import _emit, _sample_paths, _weights

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


def _pq_settings_kw(kw: dict) -> dict:
    """A lever's overrides as PqSettings keywords: the selection string -> LayerSelection."""
    kw = dict(kw)
    sel = kw.pop("selection", None)
    if sel is not None:
        keep, _, bits = sel.partition(":")
        kw["selection"] = LayerSelection(keep=parse_keep(keep), keep_bits=int(bits or 8))
    return kw


_FINETUNE_FIELDS = {"finetune_steps", "finetune_lr", "finetune_biases", "finetune_last", "finetune_scales",
                    "distill", "augment"}


def _reuse_layer_fits() -> None:
    """(--light) Rows that differ only in their fine-tuning share the per-layer phase
    (pq.search.fit_layers, deterministic under the seed): it runs once per distinct setting of the
    other fields; each row fine-tunes a copy."""
    import copy

    from cora_onnx.torch.search.pq import search

    original, memo = search.fit_layers, {}

    def cached(model, layers, order, kept, geoms, images, settings):
        key = (id(model), tuple(order), tuple(sorted(kept.items())), len(images),
               tuple(sorted((k, repr(v)) for k, v in settings.to_json().items() if k not in _FINETUNE_FIELDS)))
        if key not in memo:
            memo[key] = original(model, layers, order, kept, geoms, images, settings)
        return copy.deepcopy(memo[key])

    search.fit_layers = cached


def run_sample(args) -> None:
    """--protocol sample: rows through cora_onnx.quantize (ONNX Runtime scores the sample), or with
    --light the search and PyTorch scoring only."""
    import resource

    from cora_onnx import quantize
    from cora_onnx.onnx.verify import fidelity, top1 as top1_

    paths = _sample_paths(Path(args.shared))
    mean, std = default_normalization(args.model)
    pre = Preprocess(224, args.crop_ratio, mean, std)
    sample = load_images(paths["sample"], pre, labelled=True, class_map=load_class_map(paths["sample_map"]),
                         num_classes=1000)
    model = build_model(args.model, _weights(args)).eval()
    fused = fuse_batchnorm(model)
    float_sample = predict_torch(fused, sample)
    float_bytes = len(onnx_bytes(export_onnx(fused, 224)))
    calib = load_images(paths["calib"], pre) if args.light else None
    if args.light:
        _reuse_layer_fits()
    for lever in args.levers:
        kw = lever_options(lever)
        if args.calib_size_sample is not None:
            kw.setdefault("calib_size", args.calib_size_sample)
        rec = {"protocol": "sample", "model": args.model, "lever": lever, "options": kw, "light": bool(args.light),
               "crop_ratio": args.crop_ratio, "sample_images": len(sample), "torch_threads": args.torch_threads,
               "float_onnx_bytes": float_bytes}
        skw = _pq_settings_kw(kw)
        if args.light:
            t0 = time.perf_counter()
            plan = search_pq(fused, PqSettings(**skw), calib)
            rec["search_seconds"] = time.perf_counter() - t0
            logits = predict_torch(apply_plan_torch(fused, plan), sample)
            qbytes = len(onnx_bytes(apply_plan(export_onnx(fused, 224), plan)))
            rec.update(scored_by="pytorch", onnx_bytes=qbytes, pq_seconds=plan.meta.get("pq_seconds"), fidelity_to_float=fidelity(logits, float_sample),
                       top1=top1_(logits, sample.labels), finetune=plan.meta.get("pq_finetune", {}),
                       peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = quantize(build_model(args.model, _weights(args)), calib=paths["calib"], val=paths["sample"],
                               class_map=paths["sample_map"], method="pq", out=Path(tmp) / "m.onnx", mean=mean,
                               std=std, crop_ratio=args.crop_ratio, model_name=args.model,
                               latency_runs=args.latency_runs, threads=args.torch_threads, **skw)
                quantize_seconds = time.perf_counter() - t0  # search, export, ONNX Runtime checks and scoring
            r = res.report  # ONNX Runtime on the sample vs the float PyTorch model
            rec.update(scored_by="onnxruntime", search_seconds=r["search_seconds"], quantize_seconds=quantize_seconds,
                       peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, parity=r["parity"],
                       onnx_bytes=r["onnx_bytes"], fidelity_to_float=r["fidelity_to_float"],
                       top1=r["top1"]["quantized_onnxruntime"], finetune=r.get("pq", {}).get("finetune", {}),
                       environment=r["environment"])
        rec.update(float_top1=top1_(float_sample, sample.labels), ratio=float_bytes / rec["onnx_bytes"])
        _emit(args, rec, ("lever", "light", "fidelity_to_float", "top1", "onnx_bytes", "ratio", "search_seconds"))


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


def evaluate(name: str, fused, plan, float_bytes, fsess, val, latency_runs: int, export_model=None,
             float_logits=None) -> dict:
    base = export_model if export_model is not None else fused
    qbytes = onnx_bytes(apply_plan(export_onnx(base, 224), plan))
    qsess = session(qbytes)
    q_ort = predict_onnx(qsess, val)
    q_torch = predict_torch(apply_plan_torch(base, plan), val)
    lat = measure_latency({"float": fsess, "pq": qsess}, (3, 224, 224), runs=latency_runs) if latency_runs else None
    row = {"name": name, "top1_ort": top1(q_ort, val.labels), "top1_torch": top1(q_torch, val.labels),
           "onnx_bytes": len(qbytes), "ratio": len(float_bytes) / len(qbytes), **parity(q_ort, q_torch),
           "breakdown": file_breakdown(qbytes), "ort_decode": ort_folds_decode(qbytes)}
    if float_logits is not None:
        row["fidelity_to_float"] = fidelity(q_ort, float_logits)
    if lat:
        row["latency_float_ms"] = lat["float"]["batch_1"]["median_ms"]
        row["latency_pq_ms"] = lat["pq"]["batch_1"]["median_ms"]
    return row


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
    ap.add_argument("--light", action="store_true", help="(--protocol sample) PyTorch scoring, no ONNX Runtime")
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
    shared = Path(args.shared)
    if args.model == "resnet18":
        weights = shared / "models/resnet18-imagenet.pt"
    else:
        from cora_onnx.torch.archs.efficientnet_lite import efficientnet_lite0_weights_path

        weights = efficientnet_lite0_weights_path()
    model = build_model(args.model, weights).eval()
    pre = Preprocess(224, 1.0, *default_normalization(args.model))
    class_map = load_class_map(shared / "data/imagenette/class_map.json")
    data = shared / "data/imagenette"
    with tempfile.TemporaryDirectory() as tmp:
        calib_dir, val_dir, split = holdout_dirs(data, Path(tmp)) if args.holdout else \
            (data / "calib", data / "dev-val", None)
        val = load_images(val_dir, pre, labelled=True, class_map=class_map, num_classes=1000)
        calib = load_images(calib_dir, pre, labelled=True, class_map=class_map, num_classes=1000)
    if split:
        print(f"held-out classes: calibration on {split['calib_classes']} ({len(calib)} images), dev-val of "
              f"{split['val_classes']} ({len(val)} images)", flush=True)
    fused = fuse_batchnorm(model)
    float_bytes = onnx_bytes(export_onnx(fused, 224))
    result: dict = {"model": args.model, "args": vars(args), "float": {"onnx_bytes": len(float_bytes)}, "rows": [],
                    **({"holdout": split} if split else {})}
    if args.blocks:
        fsess = session(float_bytes)
        float_logits = predict_onnx(fsess, val)
        result["float"]["top1_ort"] = top1(float_logits, val.labels)
        print(f"{args.model} float: ORT top-1 {result['float']['top1_ort']:.2f}%  {len(float_bytes) / 1e6:.2f} MB",
              flush=True)
    selection = LayerSelection(keep=parse_keep(args.keep), keep_bits=args.keep_bits)

    if args.model == "resnet18" and not args.skip_reconstruction:
        st = PqSettings(blocks="small", codewords=args.codewords, em_iters=args.em_iters, finetune_steps=0,
                        calib_size=args.calib_size, target="weight", bias_correction=False, channel_scale=False, error_feedback=False,
                        selection=LayerSelection(keep=()))
        t0 = time.perf_counter()
        rec = resnet_reconstruction(model, st, calib)
        secs = time.perf_counter() - t0
        errs = np.array([r["relative_error"] for r in rec["layers"]])
        q_torch = predict_torch(apply_plan_torch(model, rec["plan"]), val)
        f_torch = predict_torch(model, val)
        result["reconstruction"] = {"layers": rec["layers"], "max_relative_error": float(errs.max()),
                                    "mean_relative_error": float(errs.mean()), "top1_torch": top1(q_torch, val.labels),
                                    "float_top1_torch": top1(f_torch, val.labels), "seconds": secs}
        result["reconstruction"]["layers_within_1e-5"] = int((errs <= 1e-5).sum())
        print(f"ResNet-18 un-fused, small blocks, no fine-tuning: relative weight error max {errs.max():.2e} "
              f"mean {errs.mean():.2e} over {len(errs)} layers, {int((errs <= 1e-5).sum())} within 1e-5; top-1 (PyTorch) {top1(q_torch, val.labels):.2f}% "
              f"vs float {top1(f_torch, val.labels):.2f}% ({secs:.0f} s)", flush=True)
        for r in rec["layers"]:
            print(f"  {r['name']:<24} d={r['block_size']:<3} distinct {r['distinct_subvectors']:>6}  k={r['codewords']:<4}"
                  f" rel.err {r['relative_error']:.2e}", flush=True)

    for blocks in args.blocks:
        st = PqSettings(blocks=blocks, block_size=args.block_size, codewords=args.codewords, em_iters=args.em_iters,
                        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, calib_size=args.calib_size,
                        finetune_biases=args.finetune_biases, finetune_last=args.finetune_last, selection=selection,
                        target=args.target, stats_size=args.stats_size)
        t0 = time.perf_counter()
        plan = search_pq(fused, st, calib)
        secs = time.perf_counter() - t0
        row = {"blocks": blocks, "block_size": args.block_size, "compress_s": secs,
               **evaluate(blocks, fused, plan, float_bytes, fsess, val, args.latency_runs, float_logits=float_logits)}
        row["finetune"] = dict(plan.meta.get("pq_finetune", {}))
        row["layers"] = [{"name": lp.name, **{k: v for k, v in lp.info.items() if "error" in k or k == "relative_weight_mse"}}
                         for lp in plan.layers]
        result["rows"].append(row)
        b = row["breakdown"]
        fid = row["fidelity_to_float"]
        print(f"{blocks}{' ' + args.block_size if args.block_size else ''}: ORT top-1 {row['top1_ort']:.2f}% "
              f"(float {result['float']['top1_ort']:.2f}%; agreement with float {fid['top1_agreement']:.1f}%, KL "
              f"{fid['kl_divergence']:.3f}; torch {row['top1_torch']:.2f}%, agree "
              f"{row['top1_agreement']:.1f}%, max|dlogit| {row['max_abs_error']:.1e})  {row['onnx_bytes'] / 1e6:.3f} MB "
              f"({row['ratio']:.1f}x)  compress {secs:.0f} s  latency {row.get('latency_float_ms', 0):.1f} -> "
              f"{row.get('latency_pq_ms', 0):.1f} ms  | codes {b['codes'] / 1e3:.0f} kB, codebooks "
              f"{b['codebooks'] / 1e3:.0f} kB, biases {b['biases'] / 1e3:.0f} kB, uniform {b['uniform_weights'] / 1e3:.0f}"
              f" kB, rest {b['rest'] / 1e3:.0f} kB | ORT Gather nodes {row['ort_decode']['gather_before']} -> "
              f"{row['ort_decode']['gather_after_optimization']} after load", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
