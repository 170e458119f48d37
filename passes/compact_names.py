"""CompactNamesPass: short names for every initializer and intermediate value, none for nodes."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["CompactNamesPass", "short_name", "name_width"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def short_name(i: int, width: int = 1) -> str:
    """0 -> "0", 61 -> "Z", 62 -> "10": the i-th name in base 62, left-padded with "0" to `width`."""
    out = ""
    while True:
        i, r = divmod(i, len(_DIGITS))
        out = _DIGITS[r] + out
        if i == 0:
            return out.rjust(width, "0")


def name_width(count: int) -> int:
    """Base-62 digits that name `count` values."""
    width, room = 1, len(_DIGITS)
    while room < count:
        width, room = width + 1, room * len(_DIGITS)
    return width


class CompactNamesPass(ir.passes.InPlacePass):
    """Rename the initializers and the values made by nodes (graph inputs and outputs keep theirs)
    to base-62 counters in graph order ("0", "1", ... "a", ... "10"; all `width` characters long when
    width is given, so a layer's names cost the same bytes whatever the others are), drop node names, the
    type and shape annotations of intermediate values (the file then holds no value_info; readers
    infer them), the per-node metadata and the Conv attributes that hold their defaults, and set
    `names`: new name -> old name. A compressed
    EfficientNet-Lite0 names its ~500 tensors with 30-50 characters each (`_blocks.10._project_conv
    .weight_quantized_packed_Cast`): tens of kB at 10x, more than a tenth of the file at 20x. The
    layers' choices stay readable in the model's metadata (cora_onnx.encodings) and the run's
    report. Subgraphs are not visited: the models this tool writes have none."""

    def __init__(self, width: int | None = None) -> None:
        super().__init__()
        self.width = width
        self.names: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        keep = {v.name for v in (*graph.inputs, *graph.outputs)}
        order: list[ir.Value] = list(graph.initializers.values())
        for node in graph:
            order.extend(v for v in node.outputs if v is not None)
        self.names = {}
        width = self.width or 1
        if self.width is not None and name_width(len(order)) > self.width:
            raise ir.passes.PreconditionError(f"{len(order)} values do not fit names of {self.width} characters")
        counter = 0
        taken = set(keep)
        for value in order:
            if value.name in keep:
                continue
            while short_name(counter, width) in taken:
                counter += 1
            new = short_name(counter, width)
            counter += 1
            taken.add(new)
            old = value.name
            value.name = new
            self.names[new] = old
            if not value.is_initializer():
                value.type, value.shape = None, None
        for node in graph:
            node.name = None
            node.metadata_props.clear()
            _drop_default_attributes(node)
        return ir.passes.PassResult(model, True)


def _drop_default_attributes(node: ir.Node) -> None:
    """A Conv's attributes that say what their absence says (auto_pad NOTSET, group 1, unit
    strides and dilations, zero pads)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return
    attrs = node.attributes
    defaults = {"auto_pad": lambda a: a.value == "NOTSET", "group": lambda a: a.value == 1,
                "strides": lambda a: all(v == 1 for v in a.value), "dilations": lambda a: all(v == 1 for v in a.value),
                "pads": lambda a: all(v == 0 for v in a.value)}
    for key, is_default in defaults.items():
        if key in attrs and is_default(attrs[key]):
            del attrs[key]
