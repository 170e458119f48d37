"""The report: one dict (saved as JSON for machines) and a table for people."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from cora_onnx.core.files import atomic_write

__all__ = ["environment", "format_table", "format_import_table", "write_report", "cpu_flags", "describe_cpu"]


def cpu_flags() -> dict:
    """The CPU facts that decide integer-kernel speed (x86 AVX2/AVX-512/VNNI, ARM dot product)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "arm_dotprod": "asimddp" in flags}


def describe_cpu(flags: dict | None = None) -> str:
    """One line for people: the machine and the features that decide integer-kernel speed, e.g.
    "x86_64: AVX2 yes, AVX-512 no, VNNI no" or "aarch64: dot product yes"."""
    f = cpu_flags() if flags is None else flags
    yes = lambda key: "yes" if f.get(key) else "no"  # noqa: E731
    machine = str(f.get("machine") or "unknown machine")
    if machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm"):
        return f"{machine}: dot product {yes('arm_dotprod')}"
    return f"{machine}: AVX2 {yes('avx2')}, AVX-512 {yes('avx512f')}, VNNI {yes('vnni')}"


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


def write_report(report: dict, path: str | Path) -> None:
    data = json.dumps(report, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(data + b"\n"))


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.2f} MB"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _bpw(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _weights(r: dict) -> str:
    """What the weights became: "4-bit weights", or for product quantization its blocks and rate."""
    pq = r.get("pq")
    st = r.get("size_target")
    if st:
        target = f"{st['ratio']:g}x" if st.get("ratio") else _mb(st["size"])
        return f"size target {target}, every layer's encoding chosen ({r['effective_bits']:.2f} stored bits per weight)"
    if not pq:
        return f"{r['bits']}-bit weights"
    sizes = ", ".join(f"{k} d={d}" for k, d in pq["block_sizes"].items())
    return (f"{pq['blocks']} blocks ({sizes}), up to {pq['codewords']} codewords per layer, "
            f"{r['effective_bits']:.2f} stored bits per weight")


def format_table(r: dict) -> str:
    """Human summary of a quantize report."""
    t1, lat, par = r["top1"], r["latency_ms"], r["parity"]
    ratio = r["float_onnx_bytes"] / r["onnx_bytes"] if r.get("onnx_bytes") else None
    rows = [
        ("", "float", "quantized"),
        ("top-1, PyTorch", _pct(t1["float"]), _pct(t1["quantized_torch"])),
        ("top-1, ONNX Runtime", "", _pct(t1["quantized_onnxruntime"])),
        ("ONNX file", _mb(r["float_onnx_bytes"]), f"{_mb(r['onnx_bytes'])} ({ratio:.2f}x smaller)" if ratio else "-"),
        ("file bits per weight", _bpw(r.get("float_file_bits_per_weight")), _bpw(r.get("file_bits_per_weight"))),
        (f"latency, batch 1 ({r['environment']['threads']} threads)", _ms(lat["float"]), _ms(lat["quantized"])),
    ]
    if lat.get("quantized_folded") is not None:
        rows.append(("  weights folded at load", "", _ms(lat["quantized_folded"])))
    for key, label in (("quantized_no_adapters", "  same model without adapters"),
                       ("quantized_branches", "  adapters as branch convolutions")):
        if lat.get(key) is not None:
            rows.append((label, "", _ms(lat[key])))
    w = max(len(a) for a, _, _ in rows)
    lines = [f"cora-onnx: {r['model']}, method {r['method']}, {_weights(r)} -> {r['onnx_path']}"]
    lines += [f"  {a:<{w}}  {b:>12}  {c}" for a, b, c in rows]
    pq = r.get("pq")
    if pq:
        sb = pq["stored_bytes"]
        lines.append(f"  product quantization: {pq['layers_pq']} layers (codes {sb['codes'] / 1e3:.1f} kB, codewords "
                     f"{sb['codewords'] / 1e3:.1f} kB, channel scales {sb['channel_scales'] / 1e3:.1f} kB, biases "
                     f"{sb['pq_biases'] / 1e3:.1f} kB); {pq['layers_uniform']} layers on a uniform grid "
                     f"({sb['uniform_layers'] / 1e3:.1f} kB)")
    lines.append(f"  parity ONNX Runtime vs PyTorch quantized: max |logit diff| {par['max_abs_error']:.3g}, "
                 f"top-1 agreement {par['top1_agreement']:.2f}% on {par['images']} images")
    fid = r.get("fidelity_to_float")
    if fid:
        lines.append(f"  fidelity to float (ONNX Runtime quantized vs PyTorch float): top-1 agreement "
                     f"{fid['top1_agreement']:.2f}%, mean KL {fid['kl_divergence']:.4f} nats on {fid['images']} images")
    lines.append(f"  search {r['search_seconds']:.1f} s; {r['weight_params']:,} weight parameters")
    act = r.get("activations")
    if act:
        k, sch = act["onnxruntime_kernels"], act["scheme"]
        lines.append(f"  activations: 8-bit {sch['act_dtype']}, ranges by {act['calibration']} on {act['calib_images']} "
                     f"images; weights {sch['weight_bits']}-bit ({sch['reason']})")
        lines.append(f"  ONNX Runtime kernels: {k['integer']} integer, {k['float_compute']} float Conv/Gemm/MatMul"
                     + (f"; CoRa adapters: {act['adapter_layout']}" if act.get("adapter_layout") else ""))
    if r.get("ort_format"):
        o = r["ort_format"]
        lines.append(f"  ORT format ({o['optimization_level']} optimizations): {o['bytes'] / 1e6:.2f} MB, "
                     f"{o['operator_count']} operator types: " + "; ".join(
                         f"{d} {v}: {','.join(ops)}" for d, by in o["operators"].items() for v, ops in by.items()))
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    if st := r.get("size_target"):
        lines.append(f"  size: {st['bytes']:,} bytes, limit {st['limit_bytes']:,} (predicted {st['predicted_bytes']:,}); "
                     f"weights and codes {st['weight_bytes']:,}, the rest (graph, names, biases) "
                     f"{st['overhead_bytes']:,} ({100 * st['overhead_share']:.1f}% of the file)")
        lines.append(f"  encodings: {r['auto']['summary']}")
    return "\n".join(lines)


def format_import_table(r: dict) -> str:
    """Human summary of an import-pq report."""
    t1, lat, par, cb = r["top1"], r["latency_ms"], r["parity"], r["codebooks"]
    lines = [f"cora-onnx: {r['model']} from {r['checkpoint']} -> {r['onnx_path']}",
             f"  {cb['layers']} codebook layers (codes {', '.join(cb['code_dtypes'])}: {cb['codes_bytes'] / 1e3:.1f} kB, "
             f"codewords float16: {cb['codewords_bytes'] / 1e3:.1f} kB)",
             f"  ONNX file {_mb(r['onnx_bytes'])} = {r['onnx_to_checkpoint']:.3f}x the checkpoint "
             f"({_mb(r['checkpoint_bytes'])}); float ONNX {_mb(r['float_onnx_bytes'])} "
             f"({r['compression_ratio']:.2f}x larger)"]
    if t1 is not None:
        lines.append(f"  top-1: decoded PyTorch {_pct(t1['decoded_torch'])}, ONNX Runtime {_pct(t1['onnxruntime'])} "
                     f"on {r['images']['val']} images")
    lines.append(f"  parity ONNX Runtime vs decoded PyTorch: max |logit diff| {par['max_abs_error']:.3g} "
                 f"({par['relative_max_error']:.3g} of the largest logit, limit {par['limits']['relative_error']:g}), "
                 f"top-1 agreement {par['top1_agreement']:.2f}% on {par['images']} images")
    lines.append(f"  latency, batch 1 ({r['environment']['threads']} threads): float {_ms(lat['float'])}, "
                 f"imported {_ms(lat['imported'])} (codebooks decoded when ONNX Runtime loads the file)")
    return "\n".join(lines)
