"""Latency of ONNX models in one interleaved ONNX Runtime run, and top-1 with labelled images
(the `bench` command). ONNX side: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cora_onnx.onnx.data import load_class_map
from cora_onnx.core.errors import OnnxModelError, SettingsError
from cora_onnx.onnx.evaluate import model_preprocess, session_top1
from cora_onnx.core.files import check_output_path
from cora_onnx.core.modelfile import read_model
from cora_onnx.onnx.report import describe_cpu, environment, write_report
from cora_onnx.onnx.verify import cpu_threads, image_input, measure_latency, session

__all__ = ["BenchResult", "bench", "format_bench"]


@dataclass(frozen=True)
class BenchResult:
    """latency: model -> "batch_<n>" -> median_ms, p10_ms, p90_ms, runs (cora_onnx.onnx.verify.measure_latency);
    bytes: model -> size on disk (with external data files); top1: model -> % (empty without
    data); notes: one line per model whose input is unusual (NHWC, fixed batch); environment:
    cora_onnx.onnx.report.environment (its "cpu": the CPU features)."""

    latency: dict
    bytes: dict
    batches: tuple[int, ...]
    runs: int
    warmup: int
    threads: int
    top1: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON report of `bench --report`."""
        return {"latency": self.latency, "bytes": self.bytes, **({"top1": self.top1} if self.top1 else {}), "environment": self.environment}


def bench(models: Sequence[str | Path], batches: Sequence[int] = (1,), runs: int = 50, warmup: int = 5,
          threads: int | None = None, fold_weight_dq: bool = False, data: Sequence[str | Path] = (),
          class_map: str | Path | None = None, report: str | Path | None = None) -> BenchResult:
    """Time `models` (ONNX or ORT-format files with one fixed input shape besides batch) in one
    interleaved run at each batch size; with `data` (labelled folders, mixed), also their top-1
    (preprocessing from each model's metadata). fold_weight_dq: session config
    session.disable_quant_qdq=1. Writes the JSON report to `report` when given."""
    batches = tuple(batches)
    if report is not None:
        check_output_path(report, "report")
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches):
        raise SettingsError("--runs must be >= 1, --warmup >= 0 and --batch >= 1")
    threads = threads or cpu_threads()
    sessions, shapes, specs, notes, sizes = {}, set(), {}, [], {}
    for p in models:
        mf = read_model(p)
        s = session(mf, threads=threads, fold_weight_dq=fold_weight_dq)
        sessions[str(p)] = s
        sizes[str(p)] = mf.disk_bytes
        specs[str(p)] = spec = image_input(s, str(p))
        shapes.add(tuple(d if isinstance(d, int) else -1 for d in s.get_inputs()[0].shape[1:]))
        if spec.batch is not None and any(b != spec.batch for b in batches):
            raise SettingsError(f"{p}: the batch size is fixed at {spec.batch} in the model; it cannot be timed at "
                                f"--batch {', '.join(str(b) for b in batches if b != spec.batch)}")
        if spec.describe():
            notes.append(f"{p}: {spec.describe()}")
    if len(shapes) != 1 or -1 in next(iter(shapes)):
        raise OnnxModelError(f"models need one fixed input shape (besides batch) to be compared, got {sorted(shapes)}")
    accuracy = {}
    if data:
        cmap = load_class_map(class_map) if class_map else None
        accuracy = {k: session_top1(s, k, list(data), model_preprocess(s, specs[k], k), cmap)[0]
                    for k, s in sessions.items()}
    lat = measure_latency(sessions, next(iter(shapes)), batch_sizes=batches, warmup=warmup, runs=runs, threads=threads)
    result = BenchResult(lat, sizes, batches, runs, warmup, threads, accuracy, tuple(notes), environment(threads))
    if report is not None:
        write_report(result.to_json(), report)
    return result


def format_bench(result: BenchResult) -> str:
    """The table: per model its size, and per batch size the median (p10-p90) ms and the ratio to
    the first model's median; top-1 when measured; then the run's settings, the CPU features and
    the notes."""
    res, batches, models = result.latency, result.batches, list(result.bytes)
    width = max(len(k) for k in models)
    first = models[0]
    head = f"{'model':<{width}}  {'size':>9}  " + "  ".join(f"{'batch ' + str(b) + ' median (p10-p90) ms':>34}  {'ratio':>6}"
                                              for b in batches)
    lines = [head + ("  top-1" if result.top1 else "")]
    for k in models:
        cells = [f"{res[k][f'batch_{b}']['median_ms']:8.2f} ({res[k][f'batch_{b}']['p10_ms']:.2f}-"
                 f"{res[k][f'batch_{b}']['p90_ms']:.2f})"
                 f"  {res[k][f'batch_{b}']['median_ms'] / res[first][f'batch_{b}']['median_ms']:5.2f}x"
                 for b in batches]
        row = f"{k:<{width}}  {result.bytes[k] / 1e6:6.2f} MB  " + "  ".join(f"{c:>42}" for c in cells)
        lines.append(row + (f"  {result.top1[k]:.2f}%" if result.top1 else ""))
    lines.append(f"{result.threads} threads, {result.runs} runs after {result.warmup} warm-up, interleaved; "
                 "ratio = median / first model's")
    lines.append(f"cpu: {describe_cpu(result.environment.get('cpu'))}")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
