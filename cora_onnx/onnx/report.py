"""The reports: typed records (cora_onnx.core.records), each built in one place, serialised to
JSON for machines (`--report`), and one table for people (`format_table`) for `quantize`,
`rewrite` and `export` (and `format_import_table` for `import-pq`).

- `QuantizeReport` (cora_onnx.run.outcome.make_report), `RewriteReport`
  (cora_onnx.onnx.rewrite.rewrite_onnx), `ExportReport` (cora_onnx.run.api.export_plan),
  `ImportReport` (cora_onnx.run.pq_import.import_pq);
- their sections: `Figures` (what verification measured: `Top1`, `Parity`, `Fidelity`, latency,
  `SizeBreakdown`; cora_onnx.onnx.verify), `Activations` (cora_onnx.onnx.int8.activation_report).

A report reads like the JSON it writes: `report["parity"]["top1_agreement"]`, `report.get(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cora_onnx.core.files import atomic_write
from cora_onnx.core.records import Record, flat, key, optional, to_json

if TYPE_CHECKING:
    from cora_onnx.onnx.verify import Fidelity, Parity

__all__ = ["environment", "format_table", "format_import_table", "write_report", "cpu_flags", "describe_cpu", "Top1",
           "Figures", "Activations", "Outcome", "QuantizeReport", "RewriteReport", "ExportReport", "ImportReport"]


def cpu_flags() -> dict:
    """The CPU facts that decide integer-kernel speed (x86 AVX2/AVX-512/VNNI/AMX-INT8, ARM dot product)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx_int8": "amx_int8" in flags,
            "arm_dotprod": "asimddp" in flags}


def describe_cpu(flags: dict | None = None) -> str:
    """One line for people: the machine and the features that decide integer-kernel speed, e.g.
    "x86_64: AVX2 yes, AVX-512 no, VNNI no" (", AMX-INT8 yes" when present) or "aarch64: dot product yes"."""
    f = cpu_flags() if flags is None else flags
    yes = lambda key: "yes" if f.get(key) else "no"  # noqa: E731
    machine = str(f.get("machine") or "unknown machine")
    if machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm"):
        return f"{machine}: dot product {yes('arm_dotprod')}"
    return f"{machine}: AVX2 {yes('avx2')}, AVX-512 {yes('avx512f')}, VNNI {yes('vnni')}" + \
        (", AMX-INT8 yes" if f.get("amx_int8") else "")


def _torch_version() -> str | None:
    """torch.__version__ when torch is loaded (the torch side); else the installed distribution's
    version from its metadata, so the ONNX-side commands never import torch for a report; None
    when torch is not installed."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": _torch_version(),
            "python": platform.python_version(), "threads": threads, "cpu": cpu_flags()}


def write_report(report: Mapping, path: str | Path) -> None:
    """Write a report (a record or a JSON-ready mapping) as JSON, to a temporary name then renamed."""
    data = json.dumps(to_json(report), indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(data + b"\n"))


@dataclass(frozen=True)
class Top1(Record):
    """Top-1 (percent) on the labelled images: the float model, the quantized model in PyTorch
    and in ONNX Runtime (None: not measured)."""

    float_: float | None = key("float", default=None)
    quantized_torch: float | None = None
    quantized_onnxruntime: float | None = None


@dataclass(frozen=True, kw_only=True)
class Figures(Record):
    """What verification measured: top-1, parity against the PyTorch reference, fidelity to the
    float model (with labelled images), latency (median ms at batch 1 by model, None when not
    timed; every batch's statistics by model, cora_onnx.onnx.verify.measure_latency) and the
    size breakdown of the float and quantized files."""

    top1: Top1 = field(default_factory=Top1)
    parity: Parity | None = optional()
    fidelity_to_float: Fidelity | None = optional()
    latency_ms: Mapping[str, float | None] = field(default_factory=dict)
    latency: Mapping[str, Any] = field(default_factory=dict)
    size_breakdown: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Activations(Record):
    """Integer activations: the calibration, the scheme (activation type, weight width and why),
    what ActivationQDQPass made integer and which kernels ONNX Runtime runs; with quantize, what
    ONNX Runtime is checked against and (CoRa) how the adapters run."""

    bits: int
    calibration: str
    calib_images: int
    calib_seconds: float
    scheme: Mapping[str, Any]
    integer_nodes: int
    float_nodes: tuple[str, ...]
    activation_tensors: int
    absorbed_activations: int
    onnxruntime_kernels: Mapping[str, Any]
    parity_reference: str | None = optional()
    adapter_layout: str | None = optional()


@dataclass(frozen=True, kw_only=True)
class Outcome(Record):
    """How a file was handed over: verified, or why not (failure "parity" or "constant_output",
    the one-line message, where the outputs diverge)."""

    verified: bool
    failure: str | None = optional()
    parity_error: str | None = optional()
    parity_layer: Mapping[str, Any] | None = optional()


@dataclass(frozen=True, kw_only=True)
class QuantizeReport(Record):
    """The report of `quantize` (cora_onnx.run.outcome.make_report; the file's bits per weight and
    the ORT format conversion are added when the file is written)."""

    model: str
    method: str
    bits: int
    onnx_path: str
    onnx_bytes: int
    float_onnx_bytes: int
    compression_ratio: float
    weight_params: int
    effective_bits: float
    figures: Figures = flat()
    search_seconds: float
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    layers: tuple[Mapping[str, Any], ...] = ()
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    images: Mapping[str, int] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    method_report: Mapping[str, Any] = flat(default_factory=dict)  # the method's own section ("cora", "pq", "auto")
    size_target: Mapping[str, Any] | None = optional()  # cora_onnx.run.outcome.size_target_report
    activations: Activations | None = optional()
    outcome: Outcome = flat(default_factory=lambda: Outcome(verified=True))
    file_bits_per_weight: float | None = optional()
    float_file_bits_per_weight: float | None = optional()
    ort_format: Mapping[str, Any] | None = optional()
    # wall and CPU seconds by phase of the run (load, search, export, verify; size_budget with a
    # size target) and the search's own phases (search_phases): cora_onnx.core.progress.Phases
    phases: Mapping[str, Any] | None = optional()

    @property
    def verified(self) -> bool:
        return self.outcome.verified


@dataclass(frozen=True, kw_only=True)
class RewriteReport(Record):
    """The report of `rewrite` (cora_onnx.onnx.rewrite.rewrite_onnx): the input and output files,
    the weights and activations, sizes."""

    input: str
    output: str
    opset: int
    bits: int
    batchnorm_fused: int
    input_tensor: Mapping[str, Any]
    layers: tuple[Mapping[str, Any], ...]
    opset_upgrade: Mapping[str, Any] | None = optional()
    activations: Activations | None = optional()
    input_bytes: int
    input_external_data: Mapping[str, Any] | None = optional()
    external_data: Mapping[str, Any] | None = optional()
    onnx_bytes: int
    output_bytes: int
    ort_format: Mapping[str, Any] | None = optional()
    weight_params: int
    file_bits_per_weight: float


@dataclass(frozen=True, kw_only=True)
class ExportReport(Record):
    """The report of `export --plan` (cora_onnx.run.api.export_plan): the model, the plan, the
    file written and its check against the PyTorch model with the plan applied (on random images:
    export takes no image folder)."""

    model: str
    method: str
    plan_layers: int
    integer_activations: bool
    onnx_path: str
    onnx_bytes: int
    float_onnx_bytes: int
    weight_params: int
    parity: Parity
    outcome: Outcome = flat()


@dataclass(frozen=True, kw_only=True)
class ImportReport(Record):
    """The report of `import-pq` (cora_onnx.run.pq_import.import_pq): the checkpoint, the file, its
    check against the decoded PyTorch model, the codebooks."""

    model: str
    method: str = "pq-import"
    checkpoint: str
    checkpoint_bytes: int
    onnx_path: str
    onnx_bytes: int
    onnx_to_checkpoint: float
    float_onnx_bytes: int
    compression_ratio: float
    top1: Mapping[str, float] | None  # decoded_torch, onnxruntime (None without labelled images)
    parity: Parity
    outcome: Outcome = flat()
    latency_ms: Mapping[str, float | None] = field(default_factory=dict)
    latency: Mapping[str, Any] = field(default_factory=dict)
    size_breakdown: Mapping[str, Any] = field(default_factory=dict)
    codebooks: Mapping[str, Any] = field(default_factory=dict)
    export_seconds: float
    layers: tuple[Mapping[str, Any], ...] = ()
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    images: Mapping[str, int] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.2f} MB"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _bpw(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _weights(r: QuantizeReport) -> str:
    """What the weights became: "4-bit weights", or for product quantization its blocks and rate."""
    pq = r.method_report.get("pq")
    st = r.size_target
    if st:
        target = f"{st['ratio']:g}x" if st.get("ratio") else _mb(st["size"])
        return f"size target {target}, every layer's encoding chosen ({r.effective_bits:.2f} stored bits per weight)"
    if not pq:
        return f"{r.bits}-bit weights"
    sizes = ", ".join(f"{k} d={d}" for k, d in pq["block_sizes"].items())
    return (f"{pq['blocks']} blocks ({sizes}), up to {pq['codewords']} codewords per layer, "
            f"{r.effective_bits:.2f} stored bits per weight")


@dataclass(frozen=True)
class _View:
    """What format_table shows of one report: a title, a two-column table (reference and output),
    the parity and fidelity lines, facts, activations, the ORT format and the last lines (notes)."""

    title: str
    columns: tuple[str, str]
    rows: list
    parity: Any = None
    parity_label: str = ""
    fidelity: Any = None
    facts: tuple[str, ...] = ()
    activations: Activations | None = None
    adapter_layout: str | None = None
    ort_format: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = ()
    parity_images: str = "images"


def _quantize_view(r: QuantizeReport) -> _View:
    f, t1, lat = r.figures, r.figures.top1, r.figures.latency_ms
    ratio = r.float_onnx_bytes / r.onnx_bytes if r.onnx_bytes else None
    rows = [("top-1, PyTorch", _pct(t1.float_), _pct(t1.quantized_torch)),
            ("top-1, ONNX Runtime", "", _pct(t1.quantized_onnxruntime)),
            ("ONNX file", _mb(r.float_onnx_bytes), f"{_mb(r.onnx_bytes)} ({ratio:.2f}x smaller)" if ratio else "-"),
            ("file bits per weight", _bpw(r.float_file_bits_per_weight), _bpw(r.file_bits_per_weight)),
            (f"latency, batch 1 ({r.environment.get('threads')} threads)", _ms(lat.get("float")),
             _ms(lat.get("quantized")))]
    for k, label in (("quantized_folded", "  weights folded at load"),
                     ("quantized_no_adapters", "  same model without adapters"),
                     ("quantized_branches", "  adapters as branch convolutions")):
        if lat.get(k) is not None:
            rows.append((label, "", _ms(lat[k])))
    facts = []
    pq = r.method_report.get("pq")
    if pq:
        sb = pq["stored_bytes"]
        facts.append(f"product quantization: {pq['layers_pq']} layers (codes {sb['codes'] / 1e3:.1f} kB, codewords "
                     f"{sb['codewords'] / 1e3:.1f} kB, channel scales {sb['channel_scales'] / 1e3:.1f} kB, biases "
                     f"{sb['pq_biases'] / 1e3:.1f} kB); {pq['layers_uniform']} layers on a uniform grid "
                     f"({sb['uniform_layers'] / 1e3:.1f} kB)")
    facts.append(f"search {r.search_seconds:.1f} s; {r.weight_params:,} weight parameters")
    notes = tuple(f"note: {n}" for n in r.notes)
    if st := r.size_target:
        notes += (f"size: {st['bytes']:,} bytes, limit {st['limit_bytes']:,} (predicted {st['predicted_bytes']:,}); "
                  f"weights and codes {st['weight_bytes']:,}, the rest (graph, names, biases) "
                  f"{st['overhead_bytes']:,} ({100 * st['overhead_share']:.1f}% of the file)",
                  f"encodings: {r.method_report['auto']['summary']}")
    return _View(f"cora-onnx: {r.model}, method {r.method}, {_weights(r)} -> {r.onnx_path}", ("float", "quantized"),
                 rows, f.parity, "ONNX Runtime vs PyTorch quantized", f.fidelity_to_float, tuple(facts),
                 r.activations, r.activations.adapter_layout if r.activations else None, r.ort_format, notes)


def _rewrite_view(r: RewriteReport) -> _View:
    src_ext = " with its external data" if r.input_external_data else ""
    out_ext = f" + {r.external_data['file']}" if r.external_data else ""
    ratio = r.input_bytes / r.output_bytes if r.output_bytes else None
    rows = [("ONNX file", _mb(r.input_bytes) + src_ext,
             f"{_mb(r.output_bytes)}{out_ext} ({ratio:.2f}x smaller)" if ratio else "-"),
            ("file bits per weight", _bpw(r.input_bytes * 8 / r.weight_params) if r.weight_params else "-",
             _bpw(r.file_bits_per_weight))]
    facts = (f"wrote {r.output}{out_ext} ({r.output_bytes / 1e6:.2f} MB from {r.input_bytes / 1e6:.2f} MB{src_ext}, "
             f"{r.file_bits_per_weight:.2f} file bits per weight; {len(r.layers)} weights at {r.bits} bits, "
             f"{r.batchnorm_fused} BatchNorm fused)",)
    notes = []
    if r.opset_upgrade:
        u = r.opset_upgrade
        notes.append(f"opset {u['from']} upgraded to {u['to']} (onnx.version_converter); the upgraded float model "
                     f"matches the original in ONNX Runtime on {u['check_images']} random images "
                     f"(max |diff| {u['max_abs_diff']:.2g})")
    t = r.input_tensor
    said = (["NHWC input"] if t.get("layout") == "NHWC" else []) + \
        ([f"batch fixed at {t['fixed_batch']} in the model (kept; calibration ran {t['fixed_batch']} image(s) at a "
          "time)"] if t.get("fixed_batch") is not None else [])
    if said:
        notes.append(f"input {t['name']!r}: " + "; ".join(said))
    notes = [f"note: {n}" for n in notes]
    return _View(f"cora-onnx: {r.input} rewritten, {r.bits}-bit weights"
                 f"{', 8-bit activations' if r.activations else ''} -> {r.output}", ("input", "rewritten"), rows,
                 facts=facts, activations=r.activations, ort_format=r.ort_format, notes=tuple(notes))


def _export_view(r: ExportReport) -> _View:
    ratio = r.float_onnx_bytes / r.onnx_bytes if r.onnx_bytes else None
    rows = [("ONNX file", _mb(r.float_onnx_bytes), f"{_mb(r.onnx_bytes)} ({ratio:.2f}x smaller)" if ratio else "-"),
            ("file bits per weight", _bpw(r.float_onnx_bytes * 8 / r.weight_params if r.weight_params else None),
             _bpw(r.onnx_bytes * 8 / r.weight_params if r.weight_params else None))]
    act = ", integer activations" if r.integer_activations else ""
    return _View(f"cora-onnx: {r.model}, method {r.method}, plan of {r.plan_layers} layers{act} -> {r.onnx_path}",
                 ("float", "exported"), rows, r.parity, "ONNX Runtime vs PyTorch with the plan",
                 parity_images="random images")


def format_table(r: QuantizeReport | RewriteReport | ExportReport) -> str:
    """The human summary of a quantize, rewrite or export report: a title, the reference and
    output columns (top-1, file size, bits per weight, latency), parity, fidelity to float, facts,
    integer activations, the ORT format, notes."""
    views = {QuantizeReport: _quantize_view, RewriteReport: _rewrite_view, ExportReport: _export_view}
    v = views[type(r)](r)
    rows = [("", *v.columns), *v.rows]
    w = max(len(a) for a, _, _ in rows)
    lines = [v.title] + [f"  {a:<{w}}  {b:>12}  {c}" for a, b, c in rows]
    lines += [f"  {fact}" for fact in v.facts]
    par = v.parity
    if par is not None:
        t = par.tensors
        apart = "every value equal" if t is None or t.worst is None else \
            f"at most {t.worst.max_steps} step{'s' if t.worst.max_steps > 1 else ''} apart"
        exact = f"; tensor by tensor on {t.images} images: {t.tensors} tensors, {apart}" if t is not None else ""
        lines.append(f"  parity {v.parity_label}: max |logit diff| {par.max_abs_error:.3g}, top-1 agreement "
                     f"{par.top1_agreement:.2f}% on {par.images} {v.parity_images}{exact}")
    fid = v.fidelity
    if fid is not None:
        lines.append(f"  fidelity to float (ONNX Runtime quantized vs PyTorch float): top-1 agreement "
                     f"{fid.top1_agreement:.2f}%, mean KL {fid.kl_divergence:.4f} nats on {fid.images} images")
    act = v.activations
    if act is not None:
        k, sch = act.onnxruntime_kernels, act.scheme
        lines.append(f"  activations: 8-bit {sch['act_dtype']}, ranges by {act.calibration} on {act.calib_images} "
                     f"images; weights {sch['weight_bits']}-bit ({sch['reason']})")
        lines.append(f"  ONNX Runtime kernels: {k['integer']} integer, {k['float_compute']} float Conv/Gemm/MatMul"
                     + (f"; CoRa adapters: {v.adapter_layout}" if v.adapter_layout else ""))
    if v.ort_format:
        o = v.ort_format
        lines.append(f"  ORT format ({o['optimization_level']} optimizations): {o['bytes'] / 1e6:.2f} MB, "
                     f"{o['operator_count']} operator types: " + "; ".join(
                         f"{d} {vv}: {','.join(ops)}" for d, by in o["operators"].items() for vv, ops in by.items()))
    lines += [f"  {note}" for note in v.notes]
    return "\n".join(lines)


def format_import_table(r: ImportReport) -> str:
    """Human summary of an import-pq report."""
    t1, lat, par, cb = r.top1, r.latency_ms, r.parity, r.codebooks
    lines = [f"cora-onnx: {r.model} from {r.checkpoint} -> {r.onnx_path}",
             f"  {cb['layers']} codebook layers (codes {', '.join(cb['code_dtypes'])}: {cb['codes_bytes'] / 1e3:.1f} kB, "
             f"codewords float16: {cb['codewords_bytes'] / 1e3:.1f} kB)",
             f"  ONNX file {_mb(r.onnx_bytes)} = {r.onnx_to_checkpoint:.3f}x the checkpoint "
             f"({_mb(r.checkpoint_bytes)}); float ONNX {_mb(r.float_onnx_bytes)} "
             f"({r.compression_ratio:.2f}x larger)"]
    if t1 is not None:
        lines.append(f"  top-1: decoded PyTorch {_pct(t1['decoded_torch'])}, ONNX Runtime {_pct(t1['onnxruntime'])} "
                     f"on {r.images['val']} images")
    lines.append(f"  parity ONNX Runtime vs decoded PyTorch: max |logit diff| {par.max_abs_error:.3g} "
                 f"({par.relative_max_error:.3g} of the largest logit, limit {par.limits.relative_error:g}), "
                 f"top-1 agreement {par.top1_agreement:.2f}% on {par.images} images")
    lines.append(f"  latency, batch 1 ({r.environment['threads']} threads): float {_ms(lat.get('float'))}, "
                 f"imported {_ms(lat.get('imported'))} (codebooks decoded when ONNX Runtime loads the file)")
    return "\n".join(lines)
