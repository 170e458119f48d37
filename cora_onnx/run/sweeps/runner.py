"""`sweep`: the output folder, the float reference computed once, the points not yet done run by an
executor, each one recorded (ONNX file, report, JSONL row) as it finishes, then the outputs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cora_onnx.core.errors import CoraError, InputError, SettingsError
from cora_onnx.core.files import atomic_write
from cora_onnx.run.sweeps.config import (EXECUTORS, FLOAT_NAME, MODEL_NAME, REFERENCE_NAME, REPORT_NAME, RESULTS_NAME, SETUP_NAME,
                     SweepConfig, load_config)
from cora_onnx.run.sweeps.jobs import Job, _run_inprocess, _run_ray
from cora_onnx.run.sweeps.points import Point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """rows: one summary dict per point (and "float" first), latency from the final interleaved run;
    files: name -> path of what was written (results, table, summary, png, html)."""

    out: Path
    rows: tuple[dict, ...]
    table: str
    files: Mapping[str, Path]
    ran: tuple[str, ...]


def _row(p: Point, result: dict, weight_params: int) -> dict:
    rep = result["report"] or {}
    ok = result["status"] == "ok"
    size = len(result["onnx"]) if ok else None
    fid = rep.get("fidelity_to_float", {})
    return {**p.to_json(), "status": result["status"], "onnx_bytes": size,
            "bits_per_weight": size * 8 / weight_params if ok else None,
            "agreement": fid.get("top1_agreement"), "kl": fid.get("kl_divergence"),
            "top1": rep.get("top1", {}).get("quantized_onnxruntime"),
            "latency_ms_b1": (rep.get("latency_ms") or {}).get("quantized"),
            "search_seconds": rep.get("search_seconds"), "seconds": result["seconds"], "error": result["error"]}


def _record(out: Path, p: Point, result: dict, weight_params: int) -> dict:
    """Write the point's ONNX file, then its report (the marker that the point is done), then
    append its row to the JSONL file."""
    from cora_onnx.onnx.report import write_report

    row = _row(p, result, weight_params)
    if result["status"] == "ok":
        folder = out / p.name
        folder.mkdir(exist_ok=True)
        atomic_write(folder / MODEL_NAME, lambda f: f.write(result["onnx"]))
        write_report({**result["report"], "onnx_path": str(folder / MODEL_NAME), "sweep_point": p.to_json()},
                     folder / REPORT_NAME)
    with open(out / RESULTS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


def _prepare_out(out: Path, cfg: SweepConfig) -> None:
    if not out.parent.is_dir():
        raise InputError(f"output folder {out}: directory {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} is a file")
    out.mkdir(exist_ok=True)
    setup = cfg.setup_json()
    marker = out / SETUP_NAME
    if marker.is_file():
        try:
            before = json.loads(marker.read_text())
        except ValueError:
            before = None
        if before != setup:
            diff = sorted(k for k in set(setup) | set(before or {}) if (before or {}).get(k) != setup.get(k))
            raise SettingsError(f"output folder {out} holds a sweep of another model or data ({', '.join(diff)} "
                                "differ); use another output folder")
    else:
        atomic_write(marker, lambda f: f.write(json.dumps(setup, indent=2).encode() + b"\n"))


def _reference(cfg: SweepConfig, out: Path, model):
    """The float reference, computed once per sweep folder (kept as float.onnx + reference.npz)."""
    from cora_onnx.run.api import float_reference

    ref_file, float_file = out / REFERENCE_NAME, out / FLOAT_NAME
    if ref_file.is_file() and float_file.is_file():
        with np.load(ref_file) as z:
            log.info("float reference from %s", ref_file)
            return {"logits": z["logits"], "top1": float(z["top1"]), "weight_params": int(z["weight_params"])}
    log.info("float reference: %s on %s", cfg.arch, cfg.val)
    ref = float_reference(model, cfg.val, cfg.class_map, cfg.mean, cfg.std, cfg.input_size, crop_ratio=cfg.crop_ratio,
                          batch_size=cfg.run["batch_size"])
    atomic_write(float_file, lambda f: f.write(ref.onnx))
    atomic_write(ref_file, lambda f: np.savez(f, logits=ref.logits, labels=ref.labels, top1=ref.top1,
                                              weight_params=ref.weight_params))
    return {"logits": ref.logits, "top1": ref.top1, "weight_params": ref.weight_params}


def _jobs(cfg: SweepConfig, points, logits) -> list[Job]:
    return [Job(p, cfg.arch, str(cfg.weights), cfg.point_options(p), logits, cfg.run["torch_threads"])
            for p in points]


def read_rows(out: str | os.PathLike) -> dict[str, dict]:
    """The latest JSONL row of each point in a sweep folder."""
    rows: dict[str, dict] = {}
    path = Path(out) / RESULTS_NAME
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by an interrupted run
                    continue
                rows[row["point"]] = row
    return rows


def sweep(config: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike | None = None, *,
          executor: str = "inprocess", address: str | None = None, base: str | os.PathLike | None = None
          ) -> SweepResult:
    """Run every point of a sweep config (path or dict; see the module doc) into the folder `out`
    (default: the config's `out`, else sweep-<config name>). Points whose report exists are
    skipped. Ends with one interleaved latency run over the float model and every finished point,
    the table (table.txt), summary.json, sweep.png (with matplotlib) and sweep.html."""
    from cora_onnx.run.sweeps.output import write_outputs

    if executor not in EXECUTORS:
        raise SettingsError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if address and executor != "ray":
        raise SettingsError("address is for the Ray executor (executor='ray')")
    cfg = load_config(config, base)
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SettingsError("the Ray executor needs ray: pip install 'cora-onnx[ray]'") from None
    stem = Path(config).stem if not isinstance(config, Mapping) else "config"
    out = Path(out) if out is not None else (cfg.out or Path(f"sweep-{stem}"))
    from cora_onnx.torch.models import build_model

    try:  # the last check of the weights, before any output
        model = build_model(cfg.arch, cfg.weights)
    except CoraError as exc:
        raise type(exc)(f"{cfg.source}: weights: {exc}") from None
    _prepare_out(out, cfg)
    done_before = [p for p in cfg.points if (out / p.name / REPORT_NAME).is_file()]
    todo = [p for p in cfg.points if p not in done_before]
    log.info("sweep: %d points, %d done before (skipped), %d to run (executor %s) -> %s", len(cfg.points),
             len(done_before), len(todo), executor, out)
    ref = _reference(cfg, out, model)

    def record(p: Point, result: dict) -> dict:
        return _record(out, p, result, ref["weight_params"])

    if todo:
        jobs = _jobs(cfg, todo, ref["logits"])
        if executor == "ray":
            _run_ray(jobs, record, len(cfg.points), len(done_before), address)
        else:
            _run_inprocess(jobs, record, len(cfg.points), len(done_before))
    rows = read_rows(out)
    for p in done_before:  # a report without a row (e.g. a row lost to an interrupted run): rebuild it
        if p.name not in rows or rows[p.name]["status"] != "ok":
            report = json.loads((out / p.name / REPORT_NAME).read_text())
            rows[p.name] = _record(out, p, {"status": "ok", "report": report, "error": None, "seconds": None,
                                             "onnx": (out / p.name / MODEL_NAME).read_bytes()}, ref["weight_params"])
    ordered = [rows[p.name] for p in cfg.points if p.name in rows]
    table, summary, files = write_outputs(out, cfg, ordered, ref)
    return SweepResult(out=out, rows=tuple(summary), table=table, files=files, ran=tuple(p.name for p in todo))
