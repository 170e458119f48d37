"""The bytes every encoding of every layer takes in the file, measured before any weight is fitted.

`measure_costs` applies skeleton plans (cora_onnx.core.encoding.skeleton: zero-filled arrays of
the stored shapes and types) to copies of the exported float graph with the passes a size-targeted
file goes through, compacts the names (passes.CompactNamesPass, a fixed name width) and
serializes: each initializer and node of the result belongs to the layer its original name starts
with, the rest (the graph, its shared decoding constants, the metadata) is fixed. So the file of
any choice is `fixed` + the sum of its layers' costs, to the byte but for a few bytes of length
prefixes (`MARGIN`), and the measure follows whatever the passes write. No torch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

import onnx
import onnx_ir as ir

from passes import CompactNamesPass
from passes.compact_names import name_width

from cora_onnx.core.encoding import Encoding, skeleton
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.core.plan import Plan, WeightFingerprint
from cora_onnx.onnx.pipeline import apply_plan

__all__ = ["SizeTable", "measure_costs", "compact", "finish", "predicted_bytes", "metadata_reserve",
           "encodings_metadata", "MARGIN", "ENCODINGS_KEY"]

log = logging.getLogger(__name__)

MARGIN = 16  # bytes: the length prefixes of the graph and model messages may grow by a byte or two
ENCODINGS_KEY = "cora_onnx.encodings"  # model metadata: the summary and each layer's encoding


@dataclass(frozen=True)
class SizeTable:
    """fixed: bytes of everything that belongs to no layer (with `reserve` bytes of metadata);
    costs: layer -> encoding label -> bytes; width: the name width used (the export uses it too)."""

    fixed: int
    costs: Mapping[str, Mapping[str, int]]
    width: int
    seconds: float = 0.0
    columns: int = 0
    details: Mapping[str, int] = field(default_factory=dict)

    def least(self) -> int:
        """The smallest file: every layer at its cheapest encoding."""
        return self.fixed + sum(min(c.values()) for c in self.costs.values())


def _varint_len(n: int) -> int:
    out = 1
    while n >= 0x80:
        n >>= 7
        out += 1
    return out


def _field_bytes(message) -> int:
    """A repeated message field's bytes in its parent: tag, length prefix, message."""
    n = message.ByteSize()
    return 1 + _varint_len(n) + n


def _owner(name: str, layers: list[str]) -> str | None:
    """The layer whose name (followed by '.') starts `name`, the longest one; None for none."""
    best = None
    for layer in layers:
        if name.startswith(layer + ".") and (best is None or len(layer) > len(best)):
            best = layer
    return best


def compact(model: ir.Model, width: int) -> dict[str, str]:
    """Compact the names of `model` in place (CompactNamesPass); returns new name -> old name."""
    p = CompactNamesPass(width)
    p(model)
    return p.names


def encodings_metadata(plan: Plan) -> str:
    """The ENCODINGS_KEY entry of a size-targeted file: the summary line and each layer's encoding
    by layer name, as compact JSON (`inspect` shows it)."""
    summary = plan.meta.get("auto", {}).get("summary", "")
    return json.dumps({"summary": summary, "layers": {lp.name: lp.info.get("encoding", "") for lp in plan.layers}},
                      separators=(",", ":"))


def metadata_reserve(menus: Mapping[str, list[Encoding]]) -> int:
    """Bytes the ENCODINGS_KEY entry takes at most for these menus (counted in the fixed bytes)."""
    labels = sum(len(json.dumps(n)) + max(len(e.label) for e in m) + 4 for n, m in menus.items())
    families = len({e.family for m in menus.values() for e in m})
    return 16 + len(ENCODINGS_KEY) + 40 + 24 * families + labels


def finish(model: ir.Model, plan: Plan) -> ir.Model:
    """A size-targeted plan's file (plan.meta["size_target"]): its encodings in the model's metadata
    and the compact names it was measured with; other plans' files unchanged. In place."""
    target = plan.meta.get("size_target")
    if not target:
        return model
    model.metadata_props[ENCODINGS_KEY] = encodings_metadata(plan)
    compact(model, int(target["names_width"]))
    return model


def predicted_bytes(model: ir.Model, plan: Plan, width: int) -> int:
    """The bytes of `plan`'s file, from its encodings alone (each layer's skeleton, the encodings
    metadata, compact names of `width`), before any weight is in it: `model` is the float export."""
    from cora_onnx.core.encoding import Encoding

    layers = tuple(skeleton(lp.name, lp.shape, lp.kind, Encoding.parse(lp.info["encoding"]), fingerprint=lp.fingerprint)
                   for lp in plan.layers)
    m = apply_plan(ir.from_proto(ir.to_proto(model)), plan.replace(layers=layers))
    m.metadata_props[ENCODINGS_KEY] = encodings_metadata(plan)
    compact(m, width)
    return len(onnx_bytes(m))


def _attribute(proto: onnx.ModelProto, names: dict[str, str], layers: list[str]) -> tuple[dict[str, int], int]:
    """Bytes per layer (initializers and nodes whose original names start with the layer's) and
    the file's total."""
    owned: dict[str, int] = {}
    for t in proto.graph.initializer:
        who = _owner(names.get(t.name, t.name), layers)
        if who is not None:
            owned[who] = owned.get(who, 0) + _field_bytes(t)
    for node in proto.graph.node:
        who = next((w for w in (_owner(names.get(o, o), layers) for o in node.output) if w is not None), None)
        if who is not None:
            owned[who] = owned.get(who, 0) + _field_bytes(node)
    return owned, proto.ByteSize()


def measure_costs(model: ir.Model, layers: Mapping[str, tuple[tuple[int, ...], str]],
                  menus: Mapping[str, list[Encoding]], reserve: int = 0, layout: Plan | None = None,
                  fingerprints: Mapping[str, WeightFingerprint] | None = None) -> SizeTable:
    """The SizeTable of `model` (the exported float graph, its metadata already set) for layers
    (name -> (weight shape, "conv" or "linear")) with these menus; `reserve`: metadata bytes the
    file will add (see the module doc); `layout`: a plan (its layers ignored) whose merge width and
    weight and adapter layouts the file is written with (None: Plan's defaults); `fingerprints`:
    layer -> its float weight's, so the passes find a weight the exporter renamed or transposed (a
    Linear as a MatMul) as they do for the real plan. Adapters are measured once per rank, beside
    each layer's first grid, and added to the grid's own bytes."""
    t0 = time.perf_counter()
    names = list(layers)
    plain = {n: [e for e in menus[n] if not e.rank] for n in names}
    ranks = {n: sorted({e.rank for e in menus[n] if e.rank}) for n in names}
    columns = max(max(len(v) for v in plain.values()), max((len(v) for v in ranks.values()), default=0))

    def column(j: int, adapters: bool) -> Plan:
        out = []
        for n in names:
            shape, kind = layers[n]
            enc = plain[n][min(j, len(plain[n]) - 1)]
            if adapters:
                base = next((e for e in plain[n] if e.kind == "uniform" and e.bits < 8), None)
                if base is not None and ranks[n]:
                    r = ranks[n][min(j, len(ranks[n]) - 1)]
                    adapter_bits = next(e.adapter_bits for e in menus[n] if e.rank == r)
                    enc = Encoding("uniform", base.bits, base.group, r, adapter_bits)
            out.append(skeleton(n, shape, kind, enc, fingerprint=(fingerprints or {}).get(n)))
        return Plan("auto", {}, tuple(out)) if layout is None else layout.replace(layers=tuple(out))

    plans = [(j, False, column(j, False)) for j in range(max(len(v) for v in plain.values()))]
    if any(ranks.values()):
        plans += [(j, True, column(j, True)) for j in range(max(len(v) for v in ranks.values()))]
    # a name width that holds any mix of the columns: the largest names count per layer, summed
    graphs = []
    for j, adapters, plan in plans:
        m = apply_plan(ir.from_proto(ir.to_proto(model)), plan)
        graphs.append((j, adapters, plan, m))
    count = {}
    base_values = None
    for j, adapters, plan, m in graphs:
        values = [v.name for v in m.graph.initializers.values()] + [o.name for node in m.graph for o in node.outputs]
        per = {}
        for v in values:
            who = _owner(v, names)
            per[who] = per.get(who, 0) + 1
        base_values = max(base_values or 0, per.pop(None, 0))
        for who, c in per.items():
            count[who] = max(count.get(who, 0), c)
    width = name_width(base_values + sum(count.values()))
    costs: dict[str, dict[str, int]] = {n: {} for n in names}
    adapter_cost: dict[str, dict[int, int]] = {n: {} for n in names}
    fixed = 0
    for j, adapters, plan, m in graphs:
        renamed = compact(m, width)
        proto = onnx.load_from_string(onnx_bytes(m))
        owned, total = _attribute(proto, renamed, names)
        fixed = max(fixed, total - sum(owned.values()))
        by_layer = {lp.name: lp for lp in plan.layers}
        for n in names:
            enc = plain[n][min(j, len(plain[n]) - 1)]
            lp = by_layer[n]
            if not adapters:
                costs[n][enc.label] = owned.get(n, 0)
            elif lp.adapter is not None:
                adapter_cost[n][lp.adapter.rank] = owned.get(n, 0)
    for n in names:
        for e in menus[n]:
            if e.rank:
                base = next(b for b in plain[n] if b.kind == "uniform" and b.bits < 8)
                costs[n][e.label] = costs[n][e.without_adapter().label] + adapter_cost[n][e.rank] - costs[n][base.label]
    seconds = time.perf_counter() - t0
    log.info("file size per encoding measured on %d skeleton graphs in %.1f s: fixed %d bytes, names %d characters",
             len(graphs), seconds, fixed, width)
    return SizeTable(fixed=fixed + reserve + MARGIN, costs=costs, width=width, seconds=seconds, columns=len(graphs),
                     details={"graph_and_shared": fixed, "metadata_reserve": reserve, "margin": MARGIN})
