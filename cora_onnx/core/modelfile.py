"""Model files as people have them: one self-contained ONNX file, ONNX with its weights in
external data files beside it (what torch.onnx's dynamo exporter writes by default), or ONNX
Runtime's ORT format; and an onnx_ir model serialized or written as one file. No torch, no ONNX
Runtime: the ground floor every command reads and writes through."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from cora_onnx.core.errors import OnnxModelError
from cora_onnx.core.files import atomic_write, check_input_file

__all__ = ["ModelFile", "read_model", "PROTO_LIMIT", "ORT_IDENTIFIER", "is_ort_file", "onnx_bytes", "save_onnx"]

# protobuf cannot serialize a message of 2 GiB or more: larger models keep external data
PROTO_LIMIT = 2**31 - 1
# an ORT-format file is a flatbuffer whose file identifier (bytes 4-8) is "ORTM"
ORT_IDENTIFIER = b"ORTM"


def is_ort_file(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] == ORT_IDENTIFIER


@dataclass(frozen=True, eq=False)
class ModelFile:
    """A model read from disk.

    format: "onnx" or "ort". data: the ONNX model as one self-contained serialized proto (external
    data loaded in), or the ORT-format bytes; None only for an ONNX model of 2 GiB or more (then
    ONNX Runtime loads it from `path`). disk_bytes: the file plus its external data files.
    external: external data file name (relative to the model's folder) -> bytes."""

    path: Path
    format: str
    data: bytes | None
    disk_bytes: int
    external: dict[str, int] = field(default_factory=dict)

    @property
    def source(self) -> bytes | str:
        """What onnxruntime.InferenceSession takes for this model."""
        return self.data if self.data is not None else str(self.path)

    def proto(self) -> onnx.ModelProto:
        """The ONNX model with every weight in memory (OnnxModelError for an ORT-format file)."""
        if self.format != "onnx":
            raise OnnxModelError(f"{self.path} is an ORT-format file; this needs an ONNX model (.onnx)")
        if self.data is not None:
            return onnx.load_from_string(self.data)
        return onnx.load(str(self.path))  # external data resolved beside the model, any working directory


def _external_files(proto: onnx.ModelProto, folder: Path, path: Path) -> dict[str, int]:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    files: dict[str, int] = {}
    for t in _get_all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = ExternalDataInfo(t).location
        if loc in files:
            continue
        f = (folder / loc)
        if Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise OnnxModelError(f"{path}: tensor {t.name} points to external data {loc!r} outside the model's folder")
        if not f.is_file():
            raise OnnxModelError(f"{path}: tensor {t.name} is stored in external data file {loc}, which is not "
                                 f"beside the model ({f} missing)")
        files[loc] = f.stat().st_size
    return files


def read_model(path: str | os.PathLike, what: str = "ONNX model") -> ModelFile:
    """Read and check a model file: ONNX (external data loaded from the model's own folder,
    whatever the working directory) or ORT format. OnnxModelError when it is neither."""
    p = check_input_file(path, what)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
    if is_ort_file(head):
        return ModelFile(p, "ort", p.read_bytes(), size)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise OnnxModelError(f"{p} is not a valid ONNX model (nor an ORT-format file): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    external = _external_files(proto, p.parent, p)
    total = size + sum(external.values())
    try:
        if total >= PROTO_LIMIT:
            onnx.checker.check_model(str(p))
            data = None
        else:
            if external:
                onnx.load_external_data_for_model(proto, str(p.parent))
            onnx.checker.check_model(proto)
            data = proto.SerializeToString()
    except Exception as exc:
        raise OnnxModelError(f"{p} is not a valid ONNX model: {str(exc).splitlines()[0][:200]}") from None
    if len(proto.graph.input) < 1 or len(proto.graph.output) < 1:
        raise OnnxModelError(f"{p} has no graph input or output")
    return ModelFile(p, "onnx", data, total, external)


def onnx_bytes(model: ir.Model) -> bytes:
    """The serialized model, without the value_info entries of initializers: onnx_ir writes one
    for every initializer (with the exporter's graph-signature metadata), a copy of the type and
    shape the initializer itself carries (15 kB of the EfficientNet-Lite0 small-block PQ file, see
    docs/results/pq.md). Readers, ONNX Runtime and the checker take both from the initializer."""
    proto = ir.to_proto(model)
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in inits]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return proto.SerializeToString()


def save_onnx(model: ir.Model, path: str | os.PathLike) -> int:
    """Write model atomically as a single file; returns its size in bytes."""
    data = onnx_bytes(model)
    atomic_write(path, lambda f: f.write(data))
    return len(data)
