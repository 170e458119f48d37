"""One point's job (`Job`, `run_job`: never raises for a failing point) and the executors that run
the jobs: in process, one after another, or one Ray task per point."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cora_onnx.core.errors import CoraError
from cora_onnx.run.sweeps.config import MODEL_NAME
from cora_onnx.core.options import RunOptions
from cora_onnx.run.sweeps.points import Point

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Job:
    """Everything one point needs, picklable (it travels to Ray workers): its run options (the
    output path is set by the job), the float logits it is scored against, the torch threads of
    its search."""

    point: Point
    arch: str
    weights: str
    options: RunOptions
    float_logits: np.ndarray
    torch_threads: int | None = None


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job(job: Job) -> dict:
    """Run one point through cora_onnx.quantize; never raises for a failing point. Returns
    {"status": "ok"|"failed", "report", "onnx" (bytes), "error", "seconds"}."""
    from cora_onnx.run.api import quantize
    from cora_onnx.torch.models import build_model

    p, t0 = job.point, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cora-sweep-") as tmp, _torch_threads(job.torch_threads):
        out = Path(tmp) / MODEL_NAME
        try:
            res = quantize(build_model(job.arch, job.weights), job.options.replace(out=out),
                           float_logits=job.float_logits)
            return {"status": "ok", "report": res.report.to_json(), "onnx": out.read_bytes(), "error": None,
                    "seconds": time.perf_counter() - t0}
        except CoraError as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except Exception as exc:  # a failing point must not stop the sweep: record it
            log.debug("point %s failed", p.name, exc_info=True)
            error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    return {"status": "failed", "report": None, "onnx": None, "error": error, "seconds": time.perf_counter() - t0}


def _ray_job(job: Job, log_level: int) -> dict:
    """The Ray task: the point's own progress lines go to the worker's stderr (Ray forwards them)."""
    root = logging.getLogger("cora_onnx")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[cora-onnx {job.point.name}] %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    root.propagate = False
    return run_job(job)


def _run_inprocess(jobs: list[Job], record, total: int, done: int) -> None:
    for job in jobs:
        log.info("sweep: point %d/%d %s: start", done + 1, total, job.point.name)
        done += 1
        row = record(job.point, run_job(job))
        _log_done(row, done, total)


def _run_ray(jobs: list[Job], record, total: int, done: int, address: str | None) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # a local Ray whose workers import this same cora_onnx
            pkg_root = str(Path(__file__).resolve().parents[3])  # the folder holding cora_onnx
            path = os.pathsep.join([pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ray.init(include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
        started = True
    try:
        level = logging.getLogger("cora_onnx").getEffectiveLevel()
        task = ray.remote(num_cpus=jobs[0].torch_threads or 1, max_retries=0)(_ray_job)
        pending = {task.remote(job, level): job for job in jobs}
        log.info("sweep: %d Ray tasks submitted", len(pending))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # the task itself died (worker lost, out of memory...)
                result = {"status": "failed", "report": None, "onnx": None, "seconds": None,
                          "error": f"Ray task failed: {(str(exc).strip().splitlines() or [''])[-1][:300]}"}
            done += 1
            _log_done(record(job.point, result), done, total)
    finally:
        if started:
            ray.shutdown()


def _log_done(row: dict, done: int, total: int) -> None:
    if row["status"] == "ok":
        log.info("sweep: %d/%d points done; %s: %.1f kB, agreement %.2f%%, %.1f s", done, total, row["point"],
                 row["onnx_bytes"] / 1e3, row["agreement"], row["seconds"] or 0)
    else:
        log.warning("sweep: %d/%d points done; %s FAILED: %s", done, total, row["point"], row["error"])
