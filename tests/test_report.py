"""The typed reports: their JSON (keys users read, types), read access by key, and the one table
function for quantize and rewrite."""

import json

import numpy as np

from cora_onnx.core.records import to_json
from cora_onnx.onnx.report import Activations, Figures, Outcome, QuantizeReport, RewriteReport, Top1, format_table
from cora_onnx.onnx.verify import Parity, SizeBreakdown, fidelity, judge, parity
from report_schema import ACTIVATIONS, FIDELITY, QUANTIZE, REWRITE, TENSORS, check


def _activations(**kw):
    return Activations(bits=8, calibration="minmax", calib_images=64, calib_seconds=1.5,
                       scheme={"act_dtype": "uint8", "weight_bits": 8, "reduce_range": False, "reason": "x86 with VNNI"},
                       integer_nodes=10, float_nodes=(), activation_tensors=20, absorbed_activations=8,
                       onnxruntime_kernels={"integer": 10, "float_compute": 0, "ops": {"QLinearConv": 9}}, **kw)


def _quantize_report(**kw):
    rng = np.random.default_rng(0)
    ort, ref = rng.standard_normal((20, 10)), rng.standard_normal((20, 10))
    verdict = judge(parity(ort, ort + 1e-6), "exact", ort)
    sizes = SizeBreakdown(total=1000, integer_weights=600, quant_params=50, graph=350)
    figures = Figures(top1=Top1(90.0, 89.0, 89.0), parity=verdict.parity, fidelity_to_float=fidelity(ort, ref),
                      latency_ms={"float": 1.0, "quantized": 0.5, "quantized_folded": None}, latency={},
                      size_breakdown={"float": sizes, "quantized": sizes})
    base = dict(model="digits_cnn", method="rtn", bits=4, onnx_path="m.onnx", onnx_bytes=1000,
                float_onnx_bytes=4000, compression_ratio=4.0, weight_params=2000, effective_bits=4.2, figures=figures,
                search_seconds=0.5, options={"bits": 4}, settings={"method": "rtn"}, layers=({"name": "fc", "bits": 8},),
                preprocess={"input_size": 8}, images={"calib": 64, "val": 20},
                environment={"onnxruntime": "1", "onnx": "1", "torch": None, "python": "3", "threads": 2, "cpu": {}},
                notes=("a note",), file_bits_per_weight=4.0, float_file_bits_per_weight=16.0,
                phases={**{k: {"seconds": 1.0, "cpu_seconds": 0.5} for k in ("load", "search", "export", "verify")},
                        "search_phases": {"statistics": {"seconds": 0.2, "cpu_seconds": 0.2}}})
    return QuantizeReport(**{**base, **kw})


def test_quantize_report_json_keys_and_types():
    r = _quantize_report()
    j = json.loads(json.dumps(r.to_json()))  # JSON-ready
    check(j, QUANTIZE)
    check(j["fidelity_to_float"], FIDELITY, "fidelity_to_float")
    assert j["top1"] == {"float": 90.0, "quantized_torch": 89.0, "quantized_onnxruntime": 89.0}
    assert "activations" not in j and "ort_format" not in j and "failure" not in j and "parity_error" not in j
    assert list(j)[:3] == ["model", "method", "bits"] and j["verified"] is True
    # read like the JSON, typed underneath
    assert r["parity"]["reference"] == "exact" and r.get("activations") is None and r.verified
    assert r["size_breakdown"]["quantized"]["graph"] == 350 and dict(r) == j
    failed = _quantize_report(outcome=Outcome(verified=False, failure="parity", parity_error="error", parity_layer=None))
    assert failed["verified"] is False and failed["failure"] == "parity" and "parity_layer" not in failed


def test_activations_and_tensor_check_in_json():
    from cora_onnx.onnx.verify import TensorCheck, TensorDiff

    tensors = TensorCheck(tensors=12, images=8, worst=TensorDiff("relu_3", 0.004, 1), first_over=None,
                          output_error=1e-7)
    par = Parity(0.1, 0.02, 97.0, 500)
    r = _quantize_report(activations=_activations(parity_reference="PyTorch simulation", adapter_layout="merge"),
                         figures=Figures(top1=Top1(), parity=judge(par, "simulated", np.eye(3), tensors).parity))
    j = r.to_json()
    check(j["activations"], ACTIVATIONS, "activations")
    check(j["parity"]["tensors"], TENSORS, "parity.tensors")
    assert j["parity"]["tensors"]["worst"] == {"tensor": "relu_3", "mismatch": 0.004, "max_steps": 1}
    table = format_table(r)
    assert "tensor by tensor on 8 images: 12 tensors, at most 1 step apart" in table
    assert "ONNX Runtime kernels: 10 integer, 0 float" in table and "CoRa adapters: merge" in table


def test_one_table_for_quantize_and_rewrite():
    q = format_table(_quantize_report())
    assert q.startswith("cora-onnx: digits_cnn, method rtn, 4-bit weights -> m.onnx")
    for text in ("top-1, ONNX Runtime", "(4.00x smaller)", "file bits per weight", "parity ONNX Runtime vs PyTorch "
                 "quantized", "fidelity to float", "search 0.5 s; 2,000 weight parameters", "note: a note"):
        assert text in q, text
    rw = RewriteReport(input="in.onnx", output="out.onnx", opset=21, bits=4, batchnorm_fused=2,
                       input_tensor={"name": "x", "layout": "NHWC", "fixed_batch": 1}, layers=({"name": "c"},),
                       opset_upgrade={"from": 13, "to": 21, "check_images": 4, "max_abs_diff": 1e-7},
                       activations=_activations(), input_bytes=4000, onnx_bytes=1000, output_bytes=1000,
                       weight_params=1000, file_bits_per_weight=8.0)
    check(json.loads(json.dumps(rw.to_json())), REWRITE)
    t = format_table(rw)
    assert t.startswith("cora-onnx: in.onnx rewritten, 4-bit weights, 8-bit activations -> out.onnx")
    for text in ("wrote out.onnx (0.00 MB from 0.00 MB, 8.00 file bits per weight; 1 weights at 4 bits, 2 BatchNorm "
                 "fused)", "(4.00x smaller)", "ONNX Runtime kernels: 10 integer", "note: opset 13 upgraded to 21",
                 "note: input 'x': NHWC input; batch fixed at 1"):
        assert text in t, text
    assert "parity" not in t  # no PyTorch model to compare with


def test_to_json_values():
    assert to_json({"a": (np.float32(1.5), np.int64(2)), "b": np.arange(3)}) == {"a": [1.5, 2], "b": [0, 1, 2]}
