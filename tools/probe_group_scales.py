"""Probe: would group-wise grid scales lift ResNet-18's grid-only fidelity? (a measurement, not product code)

Group-wise: one symmetric scale per group of G consecutive weights of an output channel along the
flattened (C_in*kh*kw, torch's unfold order) axis, instead of one per output channel; the last group
of a channel is shorter when G does not divide K (ONNX's blocked DequantizeLinear allows that). Each
grid is quantized grid-only (no adapters, no optimizer step) as CoRa's uniform path does it:

- per channel (--groups 0): the library's own grid (`_grid` of cora_onnx/search/cora/quantize.py:
  output-error clip `input_weighted_clip`, then `gptq_round` with act-order), the check that this
  probe reproduces `measure_cora.py --levers act-order+clip-input+no-adapters` (+ `uniform`);
- groups of G: static groups, fixed before GPTQ. Each group's range is max|w| of the group times one
  of the 13 ratios of the library's output-error clip (100% to 52%), chosen per group by the layer
  output error sum (w - w_hat) H (w - w_hat)^T for nearest rounding, by coordinate descent over the
  groups of a channel (all channels at once, exact cross terms between groups, --sweeps passes);
  scales stored as float16 (rounded before rounding the weights). Then GPTQ with act-order, each
  column on its group's scale. --layout cin: groups of G input channels at one kernel position
  instead (what opset-21 blocked DequantizeLinear does on the 4-D weight along axis 1; the flat
  layout needs the weight stored 2-D and a Reshape before the Conv).

The kept layers (first conv, classifier) take the library's 8-bit per-channel grid in every row,
as the preset plans them. Statistics (cora_onnx/search/stats.py) as the search takes them: the
calibration subset, 512 (here all --calib-size) images, at most 4 x K rows per layer, seed 0.
Scores in PyTorch on imagenet-sample/even (crop ratio 0.875): agreement with the float model and
mean KL(float || quantized). Effective bits: the low-bit convs' weights plus one float16 scale per
group (per channel: per channel); "model" adds the 8-bit kept layers (float16 scales too).

    python tools/probe_group_scales.py --bits 3 4 --groups 0 128 64 --torch-threads 1 --out grp.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger("probe_group_scales")
RATIOS = tuple(1.0 - 0.04 * i for i in range(13))  # the candidates of quantizers.input_weighted_clip


def group_scales(w2: torch.Tensor, bits: int, group: int, h: torch.Tensor, sweeps: int = 2,
                 fp16: bool = True) -> torch.Tensor:
    """(C, ceil(K / group)) symmetric scales for w2 (C, K): the library's output-error clip per group
    (quantizers._input_weighted_group_clip: per group max|w| times the ratio of RATIOS with the least
    output error e H e^T, groups visited in order `sweeps` times, each choice given the current ranges
    of the channel's other groups); fp16=False keeps them float32."""
    from cora_onnx.torch.quantizers import QuantSpec, _input_weighted_group_clip

    return _input_weighted_group_clip(w2, QuantSpec(bits=bits, group=group), h, RATIOS, sweeps, half=fp16).scale


def gptq_columns(w2: torch.Tensor, scales: torch.Tensor, bits: int, group: int, hessian: torch.Tensor,
                 act_order: bool = True) -> torch.Tensor:
    """The library's GPTQ (quantizers.gptq_round) on fixed group scales (C, ceil(K / group)): the
    integer values q (C, K)."""
    from cora_onnx.torch.quantizers import QuantSpec, QuantizedTensor, gptq_round

    qt = QuantizedTensor(q=torch.zeros(w2.shape, dtype=torch.int16), scale=scales.float(),
                         zero_point=torch.zeros(scales.shape, dtype=torch.int16), spec=QuantSpec(bits=bits, group=group))
    return gptq_round(w2, qt, hessian, act_order=act_order).q.float()


def group_quantize(w: torch.Tensor, bits: int, group: int, h: torch.Tensor, sweeps: int = 2,
                   act_order: bool = True, fp16: bool = True, layout: str = "flat") -> torch.Tensor:
    """The dequantized weight (shape of w) on a group-wise grid, GPTQ-rounded. layout "flat": groups
    of consecutive weights in torch's (C_in, kh, kw) order; "cin": groups of min(group, C_in) input
    channels at one kernel position (ONNX's blocked DequantizeLinear on the 4-D weight, axis 1)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    order = torch.arange(w2.shape[1])
    if layout == "cin" and w.dim() == 4:
        order = order.view(w.shape[1], -1).T.reshape(-1)  # kernel position major, input channel minor
        group = min(group, w.shape[1])
        if w.shape[1] % group:
            raise ValueError(f"layout cin needs groups that divide C_in ({w.shape[1]}), got {group}")
    w2, h = w2[:, order], h[order][:, order]
    s = group_scales(w2, bits, group, h, sweeps, fp16)
    cols = s.repeat_interleave(group, dim=1)[:, :w2.shape[1]]
    out = torch.empty_like(w2)
    out[:, order] = gptq_columns(w2, s, bits, group, h, act_order=act_order) * cols
    return out.reshape(w.shape)


def effective_bits(layers: dict, bits: dict[str, int], group: int, low_only: bool, layout: str = "flat") -> float:
    """Stored bits per weight: the integers plus one float16 scale per group (group 0: per channel)."""
    total = stored = 0
    for n, b in bits.items():
        if low_only and b >= 8:
            continue
        w = layers[n].weight
        k = w[0].numel()
        g = min(group, w.shape[1]) if layout == "cin" and w.dim() == 4 else group
        groups = 1 if group == 0 or b >= 8 else math.ceil(k / g)
        total += w.numel()
        stored += w.numel() * b + 16 * w.shape[0] * groups
    return stored / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--groups", type=int, nargs="*", default=[0, 128, 64], help="G per row; 0: per channel")
    ap.add_argument("--calib-size", type=int, default=400)
    ap.add_argument("--sweeps", type=int, default=2, help="coordinate-descent passes of the per-group clip")
    ap.add_argument("--no-act-order", action="store_true", help="group rows: GPTQ in natural column order")
    ap.add_argument("--layout", default="flat", choices=["flat", "cin"], help="group rows: G consecutive weights "
                    "along C_in*kh*kw (flat), or G input channels at one kernel position (cin) [flat]")
    ap.add_argument("--mixed-budgets", type=float, nargs="*", default=[],
                    help="also rows of the product's per-layer widths (per channel) under these bits per weight "
                    "(2-4.99, e.g. 3.25: the bytes of W3 with float16 scales per 64 weights)")
    ap.add_argument("--mixed-groups", type=int, default=0, help="--mixed-budgets rows: regrid the chosen widths "
                    "below 8 bits on groups of this many weights (0: per channel) [0]")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--stats-cache", default=None, help="torch.save the input statistics here / load them if present")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--table", default=None, help="print the markdown table of this JSON-lines file and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    if any(g < 0 for g in args.groups) or args.calib_size < 1 or args.sweeps < 0:
        raise SystemExit("--groups must be >= 0, --calib-size >= 1, --sweeps >= 0")
    if args.mixed_groups < 0 or any(not 2 <= m < 5 for m in args.mixed_budgets):
        raise SystemExit("--mixed-budgets must be from 2 to 4.99 bits per weight, --mixed-groups >= 0")
    if args.layout == "cin" and any(g and 64 % g and g % 64 for g in [*args.groups, args.mixed_groups]):
        raise SystemExit("--layout cin: each G must divide ResNet-18's C_in (64, 128, 256, 512) or be a multiple of 64")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.torch_threads)

    from cora_onnx.onnx.data import Preprocess, load_class_map, load_images
    from cora_onnx.torch.export import fuse_batchnorm
    from cora_onnx.torch.models import build_model, default_normalization
    from cora_onnx.torch.quantizers import quantizable_layers
    from cora_onnx.torch.search.cora import CoraSettings
    from cora_onnx.torch.search.cora.grids import _grid
    from cora_onnx.torch.search.layers import select_layers
    from cora_onnx.torch.search.stats import input_second_moments, input_width
    from cora_onnx.torch.images import as_torch
    from cora_onnx.onnx.verify import fidelity, top1
    from cora_onnx.torch.verify import predict_torch

    shared = Path(args.shared)
    pre = Preprocess(224, 0.875, *default_normalization("resnet18"))
    sample = load_images(shared / "data/imagenet-sample/even", pre, labelled=True, num_classes=1000,
                         class_map=load_class_map(shared / "data/imagenet-sample/class_map.json"))
    fused = fuse_batchnorm(build_model("resnet18", shared / "models/resnet18-imagenet.pt"))
    float_logits = predict_torch(fused, sample)
    layers = quantizable_layers(fused)
    base = CoraSettings(bits=4, budget=0.0, mixed_bits=(), group_size=0, calib_size=args.calib_size)  # act-order, clip-input

    cache = Path(args.stats_cache) if args.stats_cache else None
    if cache is not None and cache.exists():
        covs = torch.load(cache)
    else:  # as search_cora and _quantize_layers take them (one pass, every layer, from the float network)
        calib = as_torch(load_images(shared / "data/imagenette/calib", pre)).subset(base.calib_size, base.seed)
        batches = list(calib.subset(base.stats_size, base.seed + 1).batches(32))
        t0 = time.perf_counter()
        rows = {n: math.ceil(base.cov_rows * input_width(m)) for n, m in layers.items()}
        acc = input_second_moments(fused, layers, batches, rows, seed=base.seed)
        covs = {n: acc.pop(n).value() for n in layers}
        log.info("statistics on %d images: %.1f s", sum(len(b) for b in batches), time.perf_counter() - t0)
        if cache is not None:
            torch.save(covs, cache)

    def score(weights: dict[str, torch.Tensor]) -> dict:
        """Fidelity and top-1 of the float network with `weights` in place of its own."""
        originals = {n: layers[n].weight.detach().clone() for n in weights}
        try:
            with torch.no_grad():
                for n, wq in weights.items():
                    layers[n].weight.copy_(wq.reshape(layers[n].weight.shape))
            logits = predict_torch(fused, sample)
        finally:
            with torch.no_grad():
                for n, w in originals.items():
                    layers[n].weight.copy_(w)
        fid = fidelity(logits, float_logits)
        return {"agreement": fid["top1_agreement"], "kl": fid["kl_divergence"], "top1": top1(logits, sample.labels),
                "float_top1": top1(float_logits, sample.labels), "calib_images": args.calib_size,
                "sample_images": len(sample), "torch_threads": args.torch_threads}

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    kept: dict[str, torch.Tensor] = {}  # the 8-bit kept layers, the same in every row
    for b in args.bits:
        settings = CoraSettings(bits=b, budget=0.0, mixed_bits=(), group_size=0, calib_size=args.calib_size)
        bits = select_layers(layers, b, settings.selection)
        for g in args.groups:
            t0 = time.perf_counter()
            weights = {}
            for n, lb in bits.items():
                w = layers[n].weight.detach()
                if lb >= 8:
                    if n not in kept:
                        kept[n] = _grid(w, settings.spec(lb), settings, covs[n]).dequantize().float()
                    weights[n] = kept[n]
                elif g == 0:
                    weights[n] = _grid(w, settings.spec(lb), settings, covs[n]).dequantize().float()
                else:
                    weights[n] = group_quantize(w, lb, g, covs[n], args.sweeps, not args.no_act_order,
                                                layout=args.layout)
            secs = time.perf_counter() - t0
            emit({"bits": b, "group": g, "grid": "per-channel" if g == 0 else f"g{g}", **score(weights),
                  "bits_per_weight_lowbit": effective_bits(layers, bits, g, True, args.layout),
                  "bits_per_weight_model": effective_bits(layers, bits, g, False, args.layout),
                  "layout": args.layout if g else None, "act_order": g == 0 or not args.no_act_order,
                  "sweeps": args.sweeps if g else None, "quantize_seconds": secs})

    calib_images = load_images(shared / "data/imagenette/calib", pre) if args.mixed_budgets else None
    for budget in args.mixed_budgets:
        t0 = time.perf_counter()
        plan, widths = mixed_plan(fused, calib_images, budget, args.calib_size)
        secs = time.perf_counter() - t0
        bits = {n: widths.get(n, lb) for n, lb in select_layers(layers, int(budget), base.selection).items()}
        weights = {lp.name: torch.from_numpy(lp.uniform.dequantize()) for lp in plan.layers}
        g = args.mixed_groups
        for n, b in widths.items():  # --mixed-groups: the chosen widths below 8 bits regridded on groups
            if g and b < 8:
                weights[n] = group_quantize(layers[n].weight, b, g, covs[n], args.sweeps, not args.no_act_order,
                                            layout=args.layout)
        grid = f"g{g}" if g else "per-channel"
        emit({"bits": budget, "group": g, "grid": f"{grid}, widths 2/3/4/8 under {budget} bits", **score(weights),
              "widths": {b: sum(1 for v in widths.values() if v == b) for b in (2, 3, 4, 8)},
              "bits_per_weight_lowbit": mixed_bits_per_weight(layers, bits, widths, True, g),
              "bits_per_weight_model": mixed_bits_per_weight(layers, bits, widths, False, g),
              "layout": args.layout if g else None, "sweeps": args.sweeps if g else None, "search_seconds": secs})


def table(path: str) -> None:
    print("| grid | bits | bits per weight (low-bit convs / model) | agreement with float | KL | top-1 / float |")
    print("|" + " --- |" * 6)
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        name = r["grid"] + (f", layout {r['layout']}" if r.get("layout") not in (None, "flat") else "") + \
            (f", {r['sweeps']} clip sweeps" if r.get("sweeps") not in (None, 2) else "") + \
            (", natural order" if r.get("act_order") is False else "")
        print(f"| {name} | W{r['bits']:g} | {r['bits_per_weight_lowbit']:.3f} / {r['bits_per_weight_model']:.3f} | "
              f"{r['agreement']:.1f}% | {r['kl']:.3f} | {r['top1']:.1f}% / {r['float_top1']:.1f}% |")


def mixed_plan(model, calib, budget: float, calib_size: int):
    """The product's per-layer widths (2, 3, 4 or 8 bits, per-channel grids, grid only) chosen under
    `budget` bits per weight (--mixed-budget) instead of the bytes of uniform floor(budget) bits.
    Returns (plan, {layer: width} of the layers whose width was chosen)."""
    from cora_onnx.torch.search.cora import CoraSettings, search_cora

    plan = search_cora(model, CoraSettings(bits=int(budget), budget=0.0, group_size=0, mixed_budget=budget,
                                           calib_size=calib_size), calib)
    return plan, plan.meta["cora"]["mixed_bits"]["bits"]


def mixed_bits_per_weight(layers: dict, bits: dict[str, int], widths: dict[str, int], low_only: bool,
                          group: int = 0) -> float:
    """Stored bits per weight of per-layer widths (one float16 scale per channel, or per group of the
    chosen widths below 8 bits); low_only: the layers whose width was chosen, else with the kept
    8-bit layers too."""
    from cora_onnx.torch.search.cora.mixed import storage_bits

    names = [n for n in bits if not low_only or n in widths]
    stored = 0
    for n in names:
        w = layers[n].weight
        groups = math.ceil(w[0].numel() / group) if group and n in widths and bits[n] < 8 else 1
        stored += w.numel() * storage_bits(bits[n]) + 16 * w.shape[0] * groups
    return stored / sum(layers[n].weight.numel() for n in names)


if __name__ == "__main__":
    main()
