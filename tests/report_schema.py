"""The JSON report schemas users read (keys and value types), checked on the reports the tests
write: a renamed or retyped key fails here."""

from __future__ import annotations

NUM = (int, float)
OPT_NUM = (int, float, type(None))

PHASE = {"seconds": NUM, "cpu_seconds": NUM}
SIZES = {"total": int, "integer_weights": int, "float_weights": int, "quant_params": int, "other": int, "graph": int}
PARITY = {"max_abs_error": NUM, "relative_max_error": NUM, "top1_agreement": NUM, "images": int, "reference": str,
          "limits": {"relative_error": OPT_NUM, "layer_error": NUM, "agreement": OPT_NUM}, "output_spread": NUM}
TENSORS = {"tensors": int, "images": int, "first_over": (dict, type(None)), "worst": (dict, type(None)),
           "output_relative_error": NUM, "instrumented_exact": bool}
ACTIVATIONS = {"bits": int, "calibration": str, "calib_images": int, "calib_seconds": NUM,
               "scheme": {"act_dtype": str, "weight_bits": int, "reduce_range": bool, "reason": str},
               "integer_nodes": int, "float_nodes": list, "activation_tensors": int, "absorbed_activations": int,
               "onnxruntime_kernels": {"integer": int, "float_compute": int, "ops": dict}}
QUANTIZE = {
    "model": str, "method": str, "bits": int, "onnx_path": str, "onnx_bytes": int, "float_onnx_bytes": int,
    "compression_ratio": NUM, "weight_params": int, "effective_bits": NUM,
    "top1": {"float": OPT_NUM, "quantized_torch": OPT_NUM, "quantized_onnxruntime": OPT_NUM},
    "parity": PARITY,
    "latency_ms": {"float": OPT_NUM, "quantized": OPT_NUM}, "latency": dict,
    "size_breakdown": {"float": SIZES, "quantized": SIZES},
    "search_seconds": NUM, "options": dict, "settings": dict, "layers": list, "preprocess": dict,
    "images": {"calib": int, "val": int},
    "environment": {"onnxruntime": str, "onnx": str, "python": str, "threads": int, "cpu": dict},
    "notes": list, "verified": bool, "file_bits_per_weight": NUM, "float_file_bits_per_weight": NUM,
    "phases": {**{k: PHASE for k in ("load", "search", "export", "verify")}, "search_phases": dict},
}
FIDELITY = {"top1_agreement": NUM, "kl_divergence": NUM, "images": int}
REWRITE = {
    "input": str, "output": str, "opset": int, "bits": int, "batchnorm_fused": int,
    "input_tensor": {"name": str, "layout": (str, type(None)), "fixed_batch": (int, type(None))}, "layers": list,
    "input_bytes": int, "onnx_bytes": int, "output_bytes": int, "weight_params": int, "file_bits_per_weight": NUM,
}


def check(value, schema, where: str = "report") -> None:
    """AssertionError naming the key when `value` lacks a key of `schema` or a value has another type."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {type(value).__name__}"
        for k, sub in schema.items():
            assert k in value, f"{where}: no key {k!r} (keys: {sorted(value)})"
            check(value[k], sub, f"{where}.{k}")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        assert ok, f"{where}: {value!r} is {type(value).__name__}, expected {'/'.join(t.__name__ for t in types)}"


def check_quantize(report: dict, *, val: bool = True, activations: bool = False) -> None:
    check(report, QUANTIZE)
    if val:
        check(report["fidelity_to_float"], FIDELITY, "report.fidelity_to_float")
    if activations:
        check(report["activations"], ACTIVATIONS, "report.activations")
        if report["parity"]["reference"] == "simulated":
            check(report["parity"]["tensors"], TENSORS, "report.parity.tensors")
    else:
        assert "activations" not in report and "tensors" not in report["parity"]
