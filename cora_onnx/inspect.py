"""What is in an ONNX file: operators, initializers by dtype, nodes each cora-onnx pass added."""

from __future__ import annotations

from collections import Counter

import onnx

from .verify import size_breakdown

__all__ = ["inspect_model", "format_inspection"]

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
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "ops": dict(sorted(Counter(n.op_type for n in g.node).items())),
        "initializers": dtypes,
        "added_by_passes": added,
        "metadata": {p.key: p.value for p in proto.metadata_props},
        "size": size_breakdown(blob),
    }


def format_inspection(info: dict, title: str) -> str:
    lines = [f"{title}: opset {info['opset']}, {info['size']['total'] / 1e6:.2f} MB"]
    lines.append("  operators: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    lines.append("  initializers: " + ", ".join(f"{k} x{v['count']} ({v['bytes'] / 1e6:.3f} MB)"
                                                for k, v in info["initializers"].items()))
    s = info["size"]
    lines.append("  size: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in s.items() if k != "total"))
    if info["added_by_passes"]:
        by_pass = Counter(a.get("pass", "?") for a in info["added_by_passes"])
        lines.append("  added by passes: " + ", ".join(f"{k} x{v}" for k, v in by_pass.items()))
        for a in info["added_by_passes"]:
            facts = ", ".join(f"{k}={v}" for k, v in a.items() if k not in ("node", "op", "pass"))
            lines.append(f"    {a['op']:<18} {a.get('pass', '?'):<16} {facts}")
    return "\n".join(lines)
