"""2- and 3-bit grids packed into bytes (passes._packing) and decoded by ONNX Runtime at load."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import passes._packing as packing
from cora_onnx.torch.export import apply_plan_torch, export_onnx, export_program, onnx_bytes
from cora_onnx.onnx.int8 import add_activation_qdq, integer_kernels
from cora_onnx.onnx.pipeline import apply_plan, cleanup_passes
from cora_onnx.core.plan import LowRankAdapter, Plan
from cora_onnx.torch.search import LayerSelection, RtnSettings, search_rtn
from cora_onnx.onnx.verify import optimized_graph, session
from passes import QuantScheme

DECODE_OPS = {"Gather", "Mod", "Div", "MatMul", "Cast", "Slice"}


def _grid(shape, bits, signed, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    return rng.integers(lo, hi, size=shape).astype(np.int8 if signed else np.uint8)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trip_and_density(bits, signed):
    for n in (1, 2, 3, 7, 8, 9, 13, 4181, 8241):
        q = _grid((n,), bits, signed, seed=n)
        packed = packing.pack_grid(q, bits)
        k, g = packing.PACKED_BITS[bits]  # 4 values per byte at 2 bits, 8 per 3 bytes at 3 bits
        assert (k, g) == ((4, 1) if bits == 2 else (8, 3))
        assert packed.dtype == np.uint8 and packed.size == -(-n // k) * g
        got = packing.unpack_grid(packed, bits, n, signed)
        assert got.dtype == q.dtype and np.array_equal(got, q)


def _decode_model(q, bits, signed):
    """A model whose outputs are the decoded grid (and an unrelated identity of its input)."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(x)
    grid, nodes = packing.grid_value(graph, "w_quantized", q, bits, signed, "test")
    graph.extend(nodes)
    ident = ir.node("Identity", [x], name="id")
    ident.outputs[0].name, ident.outputs[0].dtype, ident.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([1])
    graph.append(ident)
    graph.outputs.extend([grid, ident.outputs[0]])
    model = ir.Model(graph, ir_version=10)
    return model, grid, nodes


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (7, 1, 1), (1,), (16, 8, 3, 3)])
def test_onnxruntime_decodes_exactly_the_grid(bits, signed, shape, monkeypatch):
    monkeypatch.setattr(packing, "MIN_SAVING", -(1 << 20))  # pack every grid, even one value
    q = _grid(shape, bits, signed, seed=len(shape))
    model, grid, nodes = _decode_model(q, bits, signed)
    assert np.array_equal(packing.grid_of(grid), q)  # the numpy reading of the graph
    ops = [n.op_type for n in nodes]
    assert ops[0] == "Cast" and ops[-1] == "Gather" and ("Slice" in ops) == bool(q.size % packing.PACKED_BITS[bits][0])
    blob = onnx_bytes(model)
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    proto = onnx.load_from_string(blob)
    packed = next(t for t in proto.graph.initializer if t.name == "w_quantized_packed")
    assert packed.data_type == onnx.TensorProto.UINT8
    for optimize in (False, True):
        got = session(blob, optimize=optimize).run(["w_quantized"], {"x": np.zeros(1, np.float32)})[0]
        assert got.dtype == q.dtype and got.shape == q.shape and np.array_equal(got, q)


class MidNet(torch.nn.Module):
    """Layers big enough to be packed (18432 and 36864 weights) around two that stay INT4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def mid():
    torch.manual_seed(0)
    return MidNet().eval()


def _plan(model, bits, **kw):
    return search_rtn(model, RtnSettings(bits=bits, selection=LayerSelection(keep=()), **kw))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_model(mid, bits, symmetric):
    plan = _plan(mid, bits, symmetric=symmetric)
    blob = onnx_bytes(apply_plan(export_onnx(mid, 8), plan))
    proto = onnx.load_from_string(blob)
    inits = {t.name: t for t in proto.graph.initializer}
    k, g = packing.PACKED_BITS[bits]
    for name, n in (("conv2", 18432), ("conv3", 36864)):
        packed = inits[f"{name}.weight_quantized_packed"]
        assert packed.data_type == onnx.TensorProto.UINT8 and len(packed.raw_data) == n // k * g
        assert f"{name}.weight_quantized" not in inits
        assert inits[f"{name}.weight_zero_point"].data_type == (onnx.TensorProto.INT8 if symmetric else onnx.TensorProto.UINT8)
    for name in ("conv1", "fc"):  # too small to gain from packing
        assert inits[f"{name}.weight_quantized"].data_type == (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4)
    opt = optimized_graph(blob)
    assert not {n.op_type for n in opt.graph.node} & DECODE_OPS  # decoded at load
    assert sum(n.op_type == "DequantizeLinear" for n in opt.graph.node) == 4
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = apply_plan_torch(mid, plan)(x).numpy()
        flt = mid(x).numpy()
    for optimize in (False, True):
        out = session(blob, optimize=optimize).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.abs(ref - flt).max() > 1e-3


def test_sub_4_bit_files_are_smaller(mid):
    sizes = {b: len(onnx_bytes(apply_plan(export_onnx(mid, 8), _plan(mid, b)))) for b in (2, 3, 4)}
    assert sizes[2] < sizes[3] < sizes[4]
    # the grids of conv2 and conv3 shrink by 1/8 (W3) and 1/4 (W2) of a byte per weight, less the
    # decoding nodes (under 1.2 kB per layer)
    assert sizes[4] - sizes[3] > 55296 / 8 - 2 * 1200 and sizes[4] - sizes[2] > 55296 / 4 - 2 * 1200


def _images(n=32, size=8):
    from cora_onnx.onnx.data import ImageSet, Preprocess

    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSet(imgs.numpy(), None, tuple(map(str, range(n))), Preprocess(size))


def _integer_model(mid, plan, merge_bits=None):
    program = export_program(mid, 8)
    model = apply_plan(program.model, plan, merge_bits)
    add_activation_qdq(model, _images(), QuantScheme("uint8", 7, "test"))
    ir.passes.PassManager(cleanup_passes())(model)
    return onnx_bytes(model)


def test_integer_kernels_form_with_packed_grids(mid, monkeypatch):
    """--act-bits 8: the packed 3-bit grids decode to INT8 at load and the convs still become
    QLinearConv, exactly as with the same grids in INT4 containers (same outputs too)."""
    plan = _plan(mid, 3)
    packed = _integer_model(mid, plan)
    monkeypatch.setattr(packing, "MIN_SAVING", 1 << 40)  # the same grids, every one in an INT4 container
    int4 = _integer_model(mid, plan)
    assert len(packed) < len(int4)
    kp, k4 = integer_kernels(packed), integer_kernels(int4)
    assert kp["ops"].get("QLinearConv") == k4["ops"].get("QLinearConv") == 3
    assert kp["integer"] == k4["integer"] and kp["float_compute"] == k4["float_compute"] == 0
    assert not set(kp["ops"]) & DECODE_OPS
    x = next(_images(8).batches(8))
    np.testing.assert_array_equal(session(packed).run(None, {"input": x})[0], session(int4).run(None, {"input": x})[0])


def test_adapter_merge_reads_the_packed_grid(mid):
    plan = _plan(mid, 3)
    rng = np.random.default_rng(1)
    a = (0.05 * rng.normal(size=(2, 32, 3, 3))).astype(np.float32)
    b = (0.05 * rng.normal(size=(64, 2, 1, 1))).astype(np.float32)
    layers = tuple(dataclasses.replace(lp, adapter=LowRankAdapter(2, a, b)) if lp.name == "conv2" else lp
                   for lp in plan.layers)
    plan = Plan(plan.method, plan.settings, layers)
    blob = onnx_bytes(apply_plan(export_onnx(mid, 8), plan, merge_bits=7))
    proto = onnx.load_from_string(blob)
    assert "conv2.weight_quantized_packed" in {t.name for t in proto.graph.initializer}
    assert not {n.op_type for n in optimized_graph(blob).graph.node} & (DECODE_OPS | {"QuantizeLinear"})
    x = torch.randn(2, 3, 8, 8)
    got = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = apply_plan_torch(mid, plan, merge_bits=7)(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
