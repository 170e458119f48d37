"""The real check: ImageNet ResNet-18 and Imagenette images from ../shared (skipped without them)."""

import pytest
import torch
import torchvision

from cora_onnx.onnx.data import Preprocess, load_class_map, load_images
from cora_onnx.torch.export import apply_plan_torch, export_onnx, fuse_batchnorm, onnx_bytes
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.torch.search import RtnSettings, search_rtn
from cora_onnx.onnx.verify import parity, predict_onnx, session, top1
from cora_onnx.torch.verify import predict_torch

from realdata import REAL_MODEL, SHARED, require_shared


@pytest.fixture(scope="module")
def real():
    require_shared()
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(REAL_MODEL, weights_only=True))
    model.eval()
    imgs = SHARED / "data" / "imagenette"
    val = load_images(imgs / "dev-val", Preprocess(), labelled=True,
                      class_map=load_class_map(imgs / "class_map.json"), num_classes=1000).subset(200)
    fused = fuse_batchnorm(model)
    return model, fused, val, len(onnx_bytes(export_onnx(fused, 224)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_resnet18_parity_and_size(real, bits):
    model, fused, val, float_size = real
    plan = search_rtn(fused, RtnSettings(bits=bits))
    blob = onnx_bytes(apply_plan(export_onnx(fused, 224), plan))
    ort_logits = predict_onnx(session(blob), val)
    torch_logits = predict_torch(apply_plan_torch(fused, plan), val)
    assert parity(ort_logits, torch_logits)["top1_agreement"] >= 99.5
    if bits <= 4:
        assert len(blob) <= float_size / 7
    if bits == 8:
        float_logits = predict_torch(model, val)
        assert top1(float_logits, val.labels) > 60  # the real weights, real images
        # 200 images: one image is 0.5 points, so compare predictions rather than accuracy
        assert parity(ort_logits, float_logits)["top1_agreement"] >= 95
        assert abs(top1(ort_logits, val.labels) - top1(float_logits, val.labels)) <= 2.0


def test_resnet18_packed_sub_4_bit_files(real):
    """Issue 14: 2- and 3-bit grids packed into bytes make the files really smaller (W3 <= 0.8x,
    W2 <= 0.6x the W4 file; first conv and classifier at 8 bits), and ONNX Runtime decodes them
    at load (no decoding node left in its optimized graph)."""
    from cora_onnx.onnx.verify import optimized_graph

    _, fused, _, _ = real
    blobs = {b: onnx_bytes(apply_plan(export_onnx(fused, 224), search_rtn(fused, RtnSettings(bits=b))))
             for b in (2, 3, 4)}
    assert len(blobs[3]) <= 0.8 * len(blobs[4]) and len(blobs[2]) <= 0.6 * len(blobs[4])
    ops = {n.op_type for n in optimized_graph(blobs[3]).graph.node}
    assert not ops & {"Gather", "Mod", "Div", "MatMul", "Cast"} and "Conv" in ops


def test_resnet18_decoded_weights_fold_at_load(real):
    """Issue 28: the default weight layout of a weight-only file (decode) is no larger than the
    DequantizeLinear layout, and ONNX Runtime's optimized graph of it is the float model's (the
    same kernels, no DequantizeLinear or decoding op left), so it runs at float speed in a plain
    session (timed by tools/bench_weight_only.py, not here)."""
    from collections import Counter

    from cora_onnx.onnx.verify import optimized_graph

    import onnx_ir as ir

    _, fused, _, _ = real
    plan = search_rtn(fused, RtnSettings(bits=4))
    exported = export_onnx(fused, 224)
    blobs = {lay: onnx_bytes(apply_plan(ir.from_proto(ir.to_proto(exported)), plan, weight_layout=lay))
             for lay in ("qdq", "decode")}
    assert len(blobs["decode"]) <= len(blobs["qdq"])
    ops = {k: Counter(n.op_type for n in optimized_graph(b).graph.node) for k, b in
           (("float", onnx_bytes(exported)), ("decode", blobs["decode"]), ("qdq", blobs["qdq"]))}
    assert ops["decode"] == ops["float"]
    assert ops["qdq"]["DequantizeLinear"] == len(plan.layers)  # the layout ONNX Runtime runs at each inference


def test_resnet18_w8a8_is_integer_from_first_quantize_to_classifier(real):
    """Issue 28: the W8A8 ResNet-18 (dynamo export) in ONNX Runtime's optimized graph has no float
    Conv/Gemm/MatMul and no float pooling between the first QuantizeLinear and the classifier:
    the global average pool runs as QLinearGlobalAveragePool; `inspect` lists no float op."""
    from cora_onnx.onnx.inspection import inspect_model
    from cora_onnx.onnx.int8 import add_activation_qdq, choose_scheme
    from cora_onnx.onnx.pipeline import cleanup_passes
    from cora_onnx.torch.export import export_program
    import onnx_ir as ir

    _, fused, val, _ = real
    scheme = choose_scheme()
    plan = search_rtn(fused, RtnSettings(bits=scheme.weight_bits))
    model = apply_plan(export_program(fused, 224).model, plan)
    assert any(n.op_type == "ReduceMean" for n in model.graph)  # what the dynamo exporter writes for the pool
    add_activation_qdq(model, val.subset(16), scheme)
    ir.passes.PassManager(cleanup_passes())(model)
    info = inspect_model(onnx_bytes(model))["onnxruntime"]
    assert info["float_ops"] == [], info["float_ops"]
    ops = info["ops"]
    assert ops["QLinearConv"] == 20 and ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    assert not {"Conv", "FusedConv", "NchwcConv", "Gemm", "MatMul", "ReduceMean", "GlobalAveragePool"} & set(ops)
