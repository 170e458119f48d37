"""Figures for importing the published product-quantized ResNet-18 (issue 15, part 1).

    OMP_NUM_THREADS=1 python tools/measure_import_pq.py [--threads 1] [--sets dev-val imagenet-sample] [--out import_pq.json]

Runs `cora_onnx.import_pq` on ../shared/models/resnet18_small_blocks.pth twice:
- dev-val (imagenette, 1,000 images, 224x224 as they are, ten-class map);
- imagenet-sample/even (500 images of 500 classes, resize 256 + centre crop 224, its class map);
and reports for each: top-1 of the decoded PyTorch model and of ONNX Runtime, top-1 agreement and
max |logit diff| (import_pq raises if parity fails), file bytes against the checkpoint's, where the
bytes of the ONNX file go (codes, codewords, BatchNorm scales, biases, the plain stem conv, the
rest: graph, names, metadata), latency (batch 1, interleaved with the float export of the same
weights), and whether ONNX Runtime folds the decoding subgraph at load (Gather nodes left in its
optimized graph). Also checks that the decoded conv weights equal those of
../shared/models/resnet18-imagenet.pt (the same network, published decoded).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cora_onnx import import_pq  # noqa: E402
from cora_onnx.onnx.verify import optimized_graph  # noqa: E402

SHARED = ROOT.parent / "shared"
CKPT = SHARED / "models" / "resnet18_small_blocks.pth"
SETS = {
    "dev-val": dict(val=SHARED / "data" / "imagenette" / "dev-val",
                    class_map=SHARED / "data" / "imagenette" / "class_map.json", crop_ratio=1.0),
    "imagenet-sample": dict(val=SHARED / "data" / "imagenet-sample" / "even",
                            class_map=SHARED / "data" / "imagenet-sample" / "class_map.json", crop_ratio=0.875),
}


def byte_roles(blob: bytes) -> dict:
    """Bytes of the file by role."""
    proto = onnx.load_from_string(blob)
    out = {"codes": 0, "codewords": 0, "bn_scales": 0, "biases": 0, "plain_weights": 0, "other_initializers": 0}
    for t in proto.graph.initializer:
        n = len(t.raw_data) if t.raw_data else t.ByteSize()
        key = ("codes" if t.name.endswith("_codes") else "codewords" if t.name.endswith("_codewords")
               else "bn_scales" if t.name.endswith("_codescale") else "biases" if "bias" in t.name
               else "plain_weights" if t.name.endswith(".weight") else "other_initializers")
        out[key] += n
    out["graph_names_metadata"] = len(blob) - sum(out.values())
    out["node_metadata_bytes"] = sum(len(p.key) + len(p.value) for nd in proto.graph.node for p in nd.metadata_props)
    out["model_metadata_bytes"] = sum(len(p.key) + len(p.value) for p in proto.metadata_props)
    return out


def decoded_matches_published(model) -> dict:
    ref = torch.load(SHARED / "models" / "resnet18-imagenet.pt", map_location="cpu", weights_only=True)
    mods = dict(model.named_modules())
    worst = max(float((mods[k[:-len(".weight")]].weight - v).abs().max())
                for k, v in ref.items() if k.endswith(".weight") and v.dim() in (2, 4))
    return {"max_abs_weight_diff_vs_resnet18_imagenet_pt": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if not CKPT.is_file():
        sys.exit(f"needs {CKPT} (../shared)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            kw = SETS[name]
            path = Path(tmp) / f"r18-{name}.onnx"
            res = import_pq(CKPT, "resnet18", path, threads=args.threads, latency_runs=args.latency_runs, **kw)
            r = res.report
            blob = path.read_bytes()
            gathers = sum(n.op_type == "Gather" for n in optimized_graph(blob).graph.node)
            results[name] = {
                "images": r["images"]["val"], "crop_ratio": kw["crop_ratio"], "top1": r["top1"],
                "parity": r["parity"], "onnx_bytes": r["onnx_bytes"], "checkpoint_bytes": r["checkpoint_bytes"],
                "onnx_to_checkpoint": r["onnx_to_checkpoint"], "float_onnx_bytes": r["float_onnx_bytes"],
                "byte_roles": byte_roles(blob), "latency_ms": r["latency_ms"],
                "gather_nodes_after_ort_optimization": gathers, "export_seconds": r["export_seconds"],
                **decoded_matches_published(res.decoded_model),
            }
            logging.info("%s: %s", name, json.dumps(results[name]))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
