"""What is in an ONNX file: operators, initializers by dtype, nodes each cora-onnx pass added."""

from __future__ import annotations

import json
from collections import Counter

import onnx

from cora_onnx.core.errors import OnnxModelError

from cora_onnx.core.modelfile import ModelFile
from cora_onnx.onnx.verify import size_breakdown

__all__ = ["inspect_model", "inspect_file", "format_inspection"]

PREFIX = "cora_onnx."


def inspect_model(blob: bytes) -> dict:
    proto = onnx.load_from_string(blob)
    g = proto.graph
    dtypes: dict[str, dict[str, int]] = {}
    for t in g.initializer:
        d = dtypes.setdefault(onnx.TensorProto.DataType.Name(t.data_type), {"count": 0, "bytes": 0})
        d["count"] += 1
        d["bytes"] += len(t.raw_data) if t.raw_data else t.ByteSize()
    added = []
    for n in g.node:
        props = {p.key[len(PREFIX):]: p.value for p in n.metadata_props if p.key.startswith(PREFIX)}
        if props:
            added.append({"node": n.name, "op": n.op_type, **props})
    grids = Counter(_grid_label(a) for a in added if "bits" in a and (
        (a["op"] == "DequantizeLinear" and a.get("pass") == "WeightQDQPass") or a.get("decoded_from") == "WeightQDQPass"))
    info = {
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "weight_grids": dict(sorted(grids.items())),
        "ops": dict(sorted(Counter(n.op_type for n in g.node).items())),
        "initializers": dtypes,
        "added_by_passes": added,
        "metadata": {p.key: p.value for p in proto.metadata_props},
        "size": size_breakdown(blob).to_json(),
    }
    if any(n.op_type == "QuantizeLinear" for n in g.node):  # integer activations: what ONNX Runtime runs
        info["onnxruntime"] = _runtime_view(blob)
    return info


def _runtime_view(blob: bytes) -> dict:
    """ONNX Runtime's optimized graph of a model with activation QDQ: its integer kernels and the
    ops that still compute on float data, with why (cora_onnx.onnx.int8.float_ops)."""
    from cora_onnx.onnx.int8 import INTEGER_OPS, float_ops
    from cora_onnx.onnx.verify import optimized_graph

    try:
        opt = optimized_graph(blob)
    except Exception as exc:  # inspect describes the file even when ONNX Runtime refuses it
        return {"error": " ".join(str(exc).split())[:300]}
    ops = Counter(n.op_type for n in opt.graph.node)
    return {"integer_kernels": sum(ops[o] for o in INTEGER_OPS), "ops": dict(sorted(ops.items())),
            "float_ops": float_ops(opt)}


def _grid_label(facts: dict) -> str:
    """"4-bit" (per channel), "4-bit per tensor", "4-bit g64" (one scale per 64 weights of a channel)."""
    gran = facts.get("granularity", "per_channel")
    suffix = f" g{facts.get('group', '?')}" if gran == "per_group" else " per tensor" if gran == "per_tensor" else ""
    return f"{facts['bits']}-bit{suffix}"


def inspect_file(mf: ModelFile) -> dict:
    """inspect_model for a model file: an ONNX file with its external data files (listed, and
    counted in the size), or an ORT-format file (what the flatbuffer tells)."""
    if mf.format == "ort":
        from cora_onnx.onnx.ort_format import ort_summary

        info = ort_summary(mf.data, str(mf.path))
    else:
        if mf.data is None:
            raise OnnxModelError(f"{mf.path} with its external data is 2 GB or more; inspect reads models below that")
        info = {"format": "onnx", **inspect_model(mf.data)}
        if mf.external:
            info["notes"] = [f"weights in {len(mf.external)} external data file(s) beside the model: "
                             + ", ".join(f"{k} ({v / 1e6:.2f} MB)" for k, v in mf.external.items())]
    info["file_bytes"] = mf.disk_bytes
    info["external_data"] = dict(mf.external)
    return info


def format_inspection(info: dict, title: str) -> str:
    total = info.get("file_bytes", info["size"]["total"])
    fmt = "ORT format, " if info.get("format") == "ort" else ""
    ext = f" ({len(info['external_data'])} external data file(s) included)" if info.get("external_data") else ""
    lines = [f"{title}: {fmt}opset {info['opset']}, {total / 1e6:.2f} MB on disk{ext}"]
    lines.append("  operators: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    lines.append("  initializers: " + ", ".join(f"{k} x{v['count']} ({v['bytes'] / 1e6:.3f} MB)"
                                                for k, v in info["initializers"].items()))
    s = info["size"]
    lines.append("  size: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in s.items() if k != "total"))
    if info.get("weight_grids"):
        lines.append("  weight grids: " + ", ".join(f"{k} x{v}" for k, v in info["weight_grids"].items()))
    if info["added_by_passes"]:
        by_pass = Counter(a.get("pass", "?") for a in info["added_by_passes"])
        lines.append("  added by passes: " + ", ".join(f"{k} x{v}" for k, v in by_pass.items()))
        for a in info["added_by_passes"]:
            facts = ", ".join(f"{k}={v}" for k, v in a.items() if k not in ("node", "op", "pass"))
            lines.append(f"    {a['op']:<18} {a.get('pass', '?'):<16} {facts}")
    encodings = info.get("metadata", {}).get("cora_onnx.encodings")
    if encodings:
        try:
            enc = json.loads(encodings)
            lines.append(f"  encodings (chosen under a size target): {enc['summary']}")
            lines += [f"    {name:<40} {label}" for name, label in enc["layers"].items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            lines.append("  encodings: unreadable cora_onnx.encodings metadata")
    rt = info.get("onnxruntime")
    if rt is not None:
        if "error" in rt:
            lines.append(f"  ONNX Runtime cannot optimize it: {rt['error']}")
        else:
            fl = rt["float_ops"]
            lines.append(f"  ONNX Runtime (optimized graph): {rt['integer_kernels']} integer kernels; "
                         f"{len(fl) or 'no'} float op{'s' if len(fl) != 1 else ''}" + (":" if fl else ""))
            for f in fl:
                where = "" if f["after_first_quantize"] else " (before the first quantize)"
                lines.append(f"    {f['op']:<18} {f['node']}{where}: {f['reason']}")
    for note in info.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)
