"""2- and 3-bit grids packed into bytes (passes._packing) and decoded by ONNX Runtime at load, on
graphs written here (no torch)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import passes._packing as packing
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.onnx.verify import session


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


def test_a_saved_and_reloaded_grid_is_still_read_as_a_grid(monkeypatch):
    """The decoding subgraph is recognised by its structure (a Gather of a 2^b-entry table), not by
    metadata: a file whose node metadata was stripped still reads back as the same grid."""
    monkeypatch.setattr(packing, "MIN_SAVING", -(1 << 20))
    q = _grid((6, 5, 3, 3), 3, True, seed=4)
    model, _, _ = _decode_model(q, 3, True)
    proto = onnx.load_from_string(onnx_bytes(model))
    for n in proto.graph.node:
        del n.metadata_props[:]
    back = ir.serde.deserialize_model(proto)
    grid = next(v for v in back.graph.outputs if v.name == "w_quantized")
    assert packing.is_grid(grid) and np.array_equal(packing.grid_of(grid), q)


def test_small_grids_stay_int4():
    """Below MIN_SAVING bytes saved, the decoding nodes would cost more than packing saves."""
    assert not packing.packs(2, 4000) and packing.packs(2, 9000) and not packing.packs(4, 1 << 20)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    value, nodes = packing.grid_value(graph, "w_quantized", _grid((100,), 2, True), 2, True, "test")
    assert nodes == [] and value.dtype == ir.DataType.INT4
