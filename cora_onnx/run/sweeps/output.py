"""What a sweep shows: the final interleaved latency run, the table, the Pareto fronts, one PNG
(matplotlib, optional) and one self-contained HTML page (inline SVG and data, no scripts)."""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Sequence

from cora_onnx.core.files import atomic_write
from cora_onnx.run.sweeps.config import FLOAT_NAME, MODEL_NAME, RESULTS_NAME

__all__ = ["pareto_front", "format_sweep_table", "write_png", "write_html", "write_outputs"]

log = logging.getLogger(__name__)

PANELS = (("agreement", "top-1 agreement with float (%)"), ("top1", "top-1 (%)"))
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def pareto_front(rows: Sequence[dict], key: str) -> list[int]:
    """Indices of the rows no other row beats: smaller or equal file and higher or equal `key`,
    one of them strictly. Rows without a size or a `key` value are never on the front."""
    ok = [(i, r["onnx_bytes"], r[key]) for i, r in enumerate(rows) if r.get("onnx_bytes") and r.get(key) is not None]
    return [i for i, s, v in ok
            if not any(s2 <= s and v2 >= v and (s2 < s or v2 > v) for j, s2, v2 in ok if j != i)]


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS = (("point", "point", "s"), ("file kB", "onnx_bytes", ".1f"), ("bits/weight", "bits_per_weight", ".2f"),
           ("agreement %", "agreement", ".2f"), ("KL nats", "kl", ".4f"), ("top-1 %", "top1", ".2f"),
           ("latency b1 ms", "latency_ms_b1", ".3f"), ("search s", "search_seconds", ".1f"))


def _cells(r: dict) -> list[str]:
    out = []
    for _, key, fmt in COLUMNS:
        v = r.get(key)
        out.append(_f(v / 1e3 if key == "onnx_bytes" and v is not None else v, fmt))
    return out


def format_sweep_table(rows: Sequence[dict], note: str = "") -> str:
    """The sweep as a text table; * marks a point on the agreement-vs-size Pareto front."""
    front = set(pareto_front(rows, "agreement"))
    body = []
    for i, r in enumerate(rows):
        if r.get("status") == "ok":
            cells = _cells(r)
            cells[0] = ("*" if i in front else " ") + cells[0]
        else:
            cells = [" " + r["point"], "failed"] + ["-"] * (len(COLUMNS) - 2)
        body.append(cells)
    head = [" " + h for h, _, _ in COLUMNS[:1]] + [h for h, _, _ in COLUMNS[1:]]
    widths = [max(len(x[k]) for x in [head] + body) for k in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(x, widths)))
             for x in [head] + body]
    failed = [r for r in rows if r.get("status") != "ok"]
    lines += [f"failed: {r['point']}: {r.get('error')}" for r in failed]
    lines.append("* on the Pareto front (smallest file for its agreement)" + (f"; {note}" if note else ""))
    return "\n".join(lines)


def _colour(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    a, b, f = _VIRIDIS[i], _VIRIDIS[i + 1], t - i
    return "#%02x%02x%02x" % tuple(round(x + (y - x) * f) for x, y in zip(a, b))


def _latency_scale(rows):
    lats = [r["latency_ms_b1"] for r in rows if r.get("latency_ms_b1") is not None]
    lo, hi = (min(lats), max(lats)) if lats else (0.0, 1.0)
    return lo, hi, (lambda v: _colour(0.5 if hi <= lo or v is None else (v - lo) / (hi - lo)))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    if len(inside) < 3:  # less than a decade: every mantissa
        inside = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                  for m in range(1, 10) if lo <= m * 10 ** e <= hi]
    return inside if len(inside) >= 2 else [lo, hi]


def _svg_panel(rows: Sequence[dict], key: str, label: str, colour) -> str:
    W, H, L, R, T, B = 520, 380, 64, 20, 28, 52
    pts = [(i, r) for i, r in enumerate(rows) if r.get("onnx_bytes") and r.get(key) is not None]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="60"><text x="10" y="30">no data</text></svg>'
    sizes = [r["onnx_bytes"] / 1e3 for _, r in pts]
    vals = [r[key] for _, r in pts]
    x0, x1 = min(sizes) / 1.15, max(sizes) * 1.15
    span = max(max(vals) - min(vals), 1.0)
    y0, y1 = min(vals) - 0.08 * span, max(vals) + 0.08 * span

    def X(s):
        return L + (math.log(s) - math.log(x0)) / (math.log(x1) - math.log(x0)) * (W - L - R)

    def Y(v):
        return T + (y1 - v) / (y1 - y0) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#888"/>']
    for t in _log_ticks(x0, x1):
        out.append(f'<line x1="{X(t):.1f}" y1="{H - B}" x2="{X(t):.1f}" y2="{H - B + 4}" stroke="#888"/>'
                   f'<text x="{X(t):.1f}" y="{H - B + 16}" text-anchor="middle">{t:g}</text>')
    for t in _nice_ticks(y0, y1):
        out.append(f'<line x1="{L - 4}" y1="{Y(t):.1f}" x2="{W - R}" y2="{Y(t):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">ONNX file size (kB, log scale)</text>'
               f'<text transform="translate(14 {(T + H - B) / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(label)}</text>')
    front = sorted(pareto_front(rows, key), key=lambda i: rows[i]["onnx_bytes"])
    if len(front) > 1:
        path = " ".join(f"{X(rows[i]['onnx_bytes'] / 1e3):.1f},{Y(rows[i][key]):.1f}" for i in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5 3"/>')
    for i, r in pts:
        x, y, c = X(r["onnx_bytes"] / 1e3), Y(r[key]), colour(r.get("latency_ms_b1"))
        tip = html.escape(f"{r['point']}: {r['onnx_bytes'] / 1e3:.1f} kB, {key} {r[key]:.2f}, latency "
                          f"{_f(r.get('latency_ms_b1'), '.3f')} ms")
        ring = ' stroke="#d62728" stroke-width="2.5"' if i in front else ' stroke="#333" stroke-width="0.8"'
        shape = (f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="{c}"{ring}>' if r["point"] == "float"
                 else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{c}"{ring}>')
        tag = "rect" if r["point"] == "float" else "circle"
        out.append(f'{shape}<title>{tip}</title></{tag}>'
                   f'<text x="{x + 8:.1f}" y="{y - 7:.1f}" font-size="10">{html.escape(r["point"])}</text>')
    out.append("</svg>")
    return "".join(out)


def _svg_legend(lo: float, hi: float) -> str:
    stops = "".join(f'<stop offset="{k / (len(_VIRIDIS) - 1):.2f}" stop-color="{_colour(k / (len(_VIRIDIS) - 1))}"/>'
                    for k in range(len(_VIRIDIS)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="360" height="44" font-family="sans-serif" font-size="11">'
            f'<defs><linearGradient id="lat">{stops}</linearGradient></defs>'
            f'<rect x="10" y="6" width="300" height="14" fill="url(#lat)" stroke="#888"/>'
            f'<text x="10" y="36">{lo:.3f} ms</text><text x="310" y="36" text-anchor="end">{hi:.3f} ms</text>'
            f'<text x="160" y="36" text-anchor="middle">latency, batch 1</text></svg>')


def write_html(rows: Sequence[dict], path: str | Path, title: str, note: str = "") -> None:
    """One self-contained page: both panels as inline SVG, the table, the data as inline JSON."""
    lo, hi, colour = _latency_scale(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS) + "<th>status</th>"
    front = set(pareto_front(rows, "agreement"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}{' *' if k == 0 and i in front else ''}</td>"
                         for k, c in enumerate(_cells(r)))
        + f"<td>{html.escape(r.get('status', ''))}{': ' + html.escape(r['error']) if r.get('error') else ''}</td></tr>"
        for i, r in enumerate(rows))
    data = json.dumps(list(rows)).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child,th:first-child,td:last-child,th:last-child{{text-align:left}}</style>
</head><body>
<h2>{html.escape(title)}</h2>
<p>Each point: file size against fidelity to the float model; colour: latency at batch 1 (one interleaved run at
the end); dashed red line and red rings: the Pareto front (no other point is smaller and at least as good);
square: the float model. {html.escape(note)}</p>
<div>{_svg_panel(rows, 'agreement', PANELS[0][1], colour)} {_svg_panel(rows, 'top1', PANELS[1][1], colour)}</div>
<div>{_svg_legend(lo, hi)}</div>
<table><tr>{head}</tr>{body}</table>
<p>* on the agreement-vs-size Pareto front</p>
<script type="application/json" id="sweep-data">{data}</script>
</body></html>
"""
    atomic_write(path, lambda f: f.write(page.encode()))


def write_png(rows: Sequence[dict], path: str | Path, title: str) -> bool:
    """The same picture as the HTML page with matplotlib; False (and nothing written) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import Normalize
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    lo, hi, _ = _latency_scale(rows)
    norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    sc = None
    for ax, (key, label) in zip(axes, PANELS):
        pts = [(i, r) for i, r in enumerate(rows) if r.get("onnx_bytes") and r.get(key) is not None]
        front = sorted(pareto_front(rows, key), key=lambda i: rows[i]["onnx_bytes"])
        if len(front) > 1:
            ax.plot([rows[i]["onnx_bytes"] / 1e3 for i in front], [rows[i][key] for i in front], "--", color="#d62728",
                    lw=1.2, label="Pareto front", zorder=1)
        for i, r in pts:
            lat = r.get("latency_ms_b1")
            sc = ax.scatter([r["onnx_bytes"] / 1e3], [r[key]], c=[lat if lat is not None else lo], cmap="viridis",
                            norm=norm, s=70, marker="s" if r["point"] == "float" else "o", zorder=2,
                            edgecolors="#d62728" if i in front else "#333", linewidths=2.2 if i in front else 0.6)
            ax.annotate(r["point"], (r["onnx_bytes"] / 1e3, r[key]), textcoords="offset points", xytext=(6, 5),
                        fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # minor ticks labelled only at 2x and 5x a power of ten (all of them overlap)
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (2.0, 5.0) else ""))
        ax.set_xlabel("ONNX file size (kB, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(front) > 1:
            ax.legend(loc="lower right", fontsize=8)
    if sc is not None:
        fig.colorbar(sc, ax=list(axes), label="latency, batch 1 (ms)")
    fig.suptitle(title)

    def save(f):
        fig.savefig(f, format="png", dpi=110)

    try:
        atomic_write(path, save)
    finally:
        plt.close(fig)
    return True


def write_outputs(out: Path, cfg, rows: Sequence[dict], ref: dict) -> tuple[str, list[dict], dict]:
    """Time the float model and every finished point in one interleaved run, then write
    latency.json, summary.json, table.txt, sweep.png and sweep.html. Returns (table, summary rows, files)."""
    from cora_onnx.onnx.report import write_report
    from cora_onnx.onnx.verify import cpu_threads, measure_latency

    ok = [r for r in rows if r["status"] == "ok"]
    threads = cfg.run["threads"] or cpu_threads()
    runs = cfg.run["final_latency_runs"]
    models = {"float": out / FLOAT_NAME, **{r["point"]: out / r["point"] / MODEL_NAME for r in ok}}
    log.info("sweep: timing %d models in one interleaved run (%d runs each, batch 1, %d threads)", len(models), runs,
             threads)
    lat = measure_latency(models, (3, cfg.input_size, cfg.input_size), runs=runs, threads=threads,
                          seed=cfg.run["seed"])
    write_report(lat, out / "latency.json")
    float_bytes = (out / FLOAT_NAME).stat().st_size
    summary = [{"point": "float", "method": "float", "bits": 32, "act_bits": None, "status": "ok",
                "onnx_bytes": float_bytes, "bits_per_weight": float_bytes * 8 / ref["weight_params"],
                "agreement": 100.0, "kl": 0.0, "top1": ref["top1"], "search_seconds": None, "error": None}]
    for r in rows:
        s = {k: v for k, v in r.items() if k not in ("latency_ms_b1", "seconds")}
        s["latency_ms_b1_point"] = r.get("latency_ms_b1")
        summary.append(s)
    for s in summary:
        s["latency_ms_b1"] = lat[s["point"]]["batch_1"]["median_ms"] if s["point"] in lat else None
    for key, _ in PANELS:
        front = set(pareto_front(summary, key))
        for i, s in enumerate(summary):
            s[f"pareto_{key}"] = i in front
    note = (f"latency: median of {runs} interleaved runs, batch 1, {threads} ONNX Runtime threads, each file as written "
            f"(low-bit weight-only files dequantize at each inference); float: {cfg.arch} BN-fused")
    table = format_sweep_table(summary, note)
    files = {"results": out / RESULTS_NAME, "latency": out / "latency.json", "summary": out / "summary.json",
             "table": out / "table.txt", "html": out / "sweep.html"}
    write_report({"model": cfg.arch, "val": str(cfg.val), "rows": summary, "note": note}, files["summary"])
    atomic_write(files["table"], lambda f: f.write(table.encode() + b"\n"))
    title = f"cora-onnx sweep: {cfg.arch}, {len(ok)} of {len(rows)} points"
    write_html(summary, files["html"], title, note)
    if write_png(summary, out / "sweep.png", title):
        files["png"] = out / "sweep.png"
    else:
        log.warning("sweep: matplotlib is not installed: no sweep.png (pip install 'cora-onnx[plot]'); "
                    "sweep.html has the same picture")
    return table, summary, files
