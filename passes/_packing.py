"""Sub-4-bit weight grids packed tightly into UINT8 initializers, decoded by a constant subgraph.

ONNX has no 3-bit type, and INT2 needs opset 25 (and ONNX Runtime 1.32 then fuses INT2 weights
into QLinearConv and refuses the session). So 2- and 3-bit grids are stored as bytes, k values in
g bytes (2 bits: 4 values per byte; 3 bits: 8 values per 3 bytes), and decoded by standard ops
whose inputs are all initializers, which ONNX Runtime constant-folds when the session loads:

    packed (m, g) UINT8 -> Cast INT64 [-> MatMul (1, 256, 65536)^T]                  one word per group
      -> Div (1, 2^b, 2^2b, ...) -> Mod 2^b                                          (m, k) codes
      -> Reshape [-> Slice 0:n] -> Reshape(weight shape) -> Gather(lookup)           the grid

Layout (the one definition, see `pack_grid`): value i of the grid flattened in C order is code
i % k of group i // k, at bits b*(i % k) .. b*(i % k) + b - 1 of the group's little-endian word;
the code is the value in two's complement (signed grids) or the value itself (unsigned); the last
group is padded with zeros. Small grids (`packs`) stay INT4: their decoding nodes would cost more
than the packing saves. The lookup (2^b entries, INT8 or UINT8) maps codes to values, so the
decoded grid is an INT8 (signed) or UINT8 (unsigned) tensor: an 8-bit container for
DequantizeLinear, whose zero point then is INT8 / UINT8 too (`zero_point_bits`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._util import add_initializer, int_tensor, mark, shared_const

__all__ = ["PACKED_BITS", "MIN_SAVING", "pack_grid", "unpack_grid", "packs", "grid_value", "zero_point_bits",
           "is_grid", "grid_of"]

PACKED_BITS = {2: (4, 1), 3: (8, 3)}  # bits -> (values per group, bytes per group)
MIN_SAVING = 2048  # bytes a packed grid must save over INT4 to be worth its decoding nodes (~1 kB)


def _lookup(bits: int, signed: bool) -> np.ndarray:
    codes = np.arange(1 << bits)
    if signed:
        return np.where(codes < (1 << (bits - 1)), codes, codes - (1 << bits)).astype(np.int8)
    return codes.astype(np.uint8)


def pack_grid(values: np.ndarray, bits: int) -> np.ndarray:
    """Integer grid (any shape, values within the signed or unsigned `bits`-bit range) -> (m, g) uint8."""
    k, g = PACKED_BITS[bits]
    codes = np.asarray(values).reshape(-1).astype(np.int64) & ((1 << bits) - 1)
    m = -(-codes.size // k)
    codes = np.pad(codes, (0, m * k - codes.size)).reshape(m, k)
    word = (codes << (bits * np.arange(k, dtype=np.int64))).sum(axis=1)
    return ((word[:, None] >> (8 * np.arange(g, dtype=np.int64))) & 0xFF).astype(np.uint8)


def unpack_grid(packed: np.ndarray, bits: int, size: int, signed: bool) -> np.ndarray:
    """The inverse of pack_grid: the first `size` values, flat, int8 (signed) or uint8."""
    k, g = PACKED_BITS[bits]
    word = (np.asarray(packed).reshape(-1, g).astype(np.int64) << (8 * np.arange(g, dtype=np.int64))).sum(axis=1)
    codes = (word[:, None] >> (bits * np.arange(k, dtype=np.int64))) & ((1 << bits) - 1)
    return _lookup(bits, signed)[codes.reshape(-1)[:size]]


def packs(bits: int, size: int) -> bool:
    """Whether a `bits`-bit grid of `size` values is stored packed in bytes: at 2-3 bits, when that
    saves at least MIN_SAVING bytes over an INT4 container (the decoding nodes, their names and the
    8-bit zero points take about 1 kB per layer; a small grid stays INT4, which costs less)."""
    if bits not in PACKED_BITS:
        return False
    k, g = PACKED_BITS[bits]
    return (size + 1) // 2 - -(-size // k) * g >= MIN_SAVING


def zero_point_bits(bits: int, size: int) -> int:
    """The container width of the DequantizeLinear zero point next to a `bits`-bit grid of `size` values."""
    return 8 if packs(bits, size) else bits


def grid_value(graph: ir.Graph, name: str, values: np.ndarray, bits: int, signed: bool,
               pass_name: str) -> tuple[ir.Value, list[ir.Node]]:
    """The integer grid as a graph value named `name`: the output of the decoding subgraph of
    `<name>_packed` (module doc) when `packs(bits, size)`, else an initializer (packed INT4/UINT4 up
    to 4 bits, INT8/UINT8 from 5 bits). Returns the value and the decoding nodes, in order, for the caller to insert.
    Decoding nodes and their outputs are named `<name>_<op>`; their intermediate values carry no
    type annotations (nothing but ONNX Runtime's constant folding reads them, and annotations
    would cost file bytes); the Gather carries the provenance (for `inspect`)."""
    values = np.asarray(values)
    if not packs(bits, values.size):
        return add_initializer(graph, name, int_tensor(values, bits, signed, name)), []
    k, g = PACKED_BITS[bits]
    n = int(values.size)
    packed = add_initializer(graph, f"{name}_packed", ir.Tensor(pack_grid(values, bits), name=f"{name}_packed"))
    base = f"cora_onnx.unpack{bits}"
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=f"{name}_{op}" + (f"_{len(nodes)}" if op == "Reshape" else ""))
        node.outputs[0].name = node.name
        nodes.append(node)
        return node.outputs[0]

    x = add("Cast", [packed], to=ir.DataType.INT64)
    if g > 1:  # one little-endian word per group
        x = add("MatMul", [x, shared_const(graph, f"{base}.bytes",
                                           (256 ** np.arange(g, dtype=np.int64)).reshape(g, 1))])
    x = add("Div", [x, shared_const(graph, f"{base}.shifts",
                                    ((1 << bits) ** np.arange(k, dtype=np.int64)).reshape(1, k))])
    x = add("Mod", [x, shared_const(graph, f"{base}.modulus", np.array(1 << bits, np.int64))])
    if n % k:  # the last group is padded
        x = add("Reshape", [x, shared_const(graph, "cora_onnx.unpack.flat", np.array([-1], np.int64))])
        x = add("Slice", [x, shared_const(graph, "cora_onnx.unpack.zero", np.array([0], np.int64)),
                          add_initializer(graph, f"{name}_length",
                                          ir.Tensor(np.array([n], np.int64), name=f"{name}_length"))])
    x = add("Reshape", [x, add_initializer(graph, f"{name}_shape", ir.Tensor(np.array(values.shape, np.int64),
                                                                                name=f"{name}_shape"))])
    lut = shared_const(graph, f"{base}.{'int8' if signed else 'uint8'}", _lookup(bits, signed))
    gather = ir.node("Gather", [lut, x], attributes={"axis": 0}, name=f"{name}_Gather")
    out = gather.outputs[0]
    out.name, out.dtype, out.shape = name, ir.DataType.INT8 if signed else ir.DataType.UINT8, ir.Shape(values.shape)
    mark(gather, pass_name, packed_bits=bits)
    nodes.append(gather)
    return out, nodes


def _decoder(value: ir.Value) -> tuple[ir.Node, int] | None:
    """(the decoding Gather, the grid's width) when `value` is the output of a decoding subgraph:
    a Gather of a constant lookup table of 2^b 8-bit entries (b in PACKED_BITS) by computed codes.
    Recognised by its structure, not by metadata."""
    node = value.producer()
    if node is None or node.op_type != "Gather" or len(node.inputs) != 2 or node.inputs[0] is None:
        return None
    lut = node.inputs[0].const_value
    if lut is None or node.inputs[1] is None or node.inputs[1].const_value is not None:
        return None
    bits = {1 << b: b for b in PACKED_BITS}.get(int(np.prod(lut.shape)))
    if bits is None or lut.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return None
    return node, bits


def is_grid(value: ir.Value | None) -> bool:
    """True for an integer initializer or the output of a decoding subgraph (cheap: no decoding)."""
    return value is not None and (value.const_value is not None or _decoder(value) is not None)


def _packed_source(node: ir.Node) -> ir.Value | None:
    """The UINT8 initializer a decoding subgraph starts from (walking up from its Gather)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for v in n.inputs:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            if v.const_value is not None and n.op_type == "Cast" and v.dtype == ir.DataType.UINT8:
                return v
            if v.producer() is not None:
                todo.append(v.producer())
    return None


def grid_of(value: ir.Value | None) -> np.ndarray | None:
    """The integer values of a grid value: an initializer's, or a decoding subgraph's (decoded in
    numpy from its packed initializer, in the grid's shape); None for anything else."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    found = _decoder(value)
    packed = _packed_source(found[0]) if found is not None else None
    if packed is None:
        return None
    shape = tuple(int(d) for d in value.shape)
    flat = unpack_grid(packed.const_value.numpy(), found[1], int(np.prod(shape)), value.dtype == ir.DataType.INT8)
    return flat.reshape(shape)
