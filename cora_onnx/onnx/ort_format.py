"""ONNX Runtime's ORT format (for onnxruntime mobile / minimal builds), written by onnxruntime
itself: the same session-based conversion as onnxruntime.tools.convert_onnx_models_to_ort, and
the operator / opset report read back from the ORT file by onnxruntime.tools (the list a
reduced runtime build must include)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from cora_onnx.core.errors import OnnxModelError, SettingsError
from cora_onnx.core.progress import Progress

__all__ = ["ORT_LEVELS", "to_ort", "ort_operators", "ort_summary"]

log = logging.getLogger(__name__)

# "extended" keeps the file portable across CPUs (integer QDQ fusions are applied, no
# machine-specific NCHWc layouts); "all" adds those (x86 AVX2/AVX-512 only); "basic" only folds.
ORT_LEVELS = ("basic", "extended", "all")


def ort_operators(ort_path: str | Path) -> dict:
    """{"<domain>": {"<opset>": [op types]}} required by an ORT-format model."""
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    quiet = logging.getLogger("ort_format_model.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # onnxruntime.tools logs every config it writes at INFO
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "required_operators.config"
        try:
            create_config_from_models([Path(ort_path)], cfg, enable_type_reduction=False)
        finally:
            quiet.setLevel(level)
        out: dict = {}
        for line in cfg.read_text().splitlines():
            if not line or line.startswith("#"):
                continue
            domain, opset, ops = line.split(";", 2)
            out.setdefault(domain, {})[opset] = sorted(o for o in ops.split(",") if o)
    return out


def to_ort(model_bytes: bytes, level: str = "extended") -> tuple[bytes, dict]:
    """Convert ONNX bytes to ORT format; returns (ort bytes, report with operators per opset)."""
    import onnxruntime as ort

    if level not in ORT_LEVELS:
        raise SettingsError(f"ORT format optimization level must be one of {', '.join(ORT_LEVELS)}, got {level!r}")
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory() as tmp, Progress("ORT format conversion", quiet_end=True):
        path = Path(tmp) / "model.ort"
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = str(path)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OnnxModelError(f"ONNX Runtime cannot convert the model to ORT format: "
                                 f"{str(exc).splitlines()[0][:300]}") from None
        data = path.read_bytes()
        ops = ort_operators(path)
    report = {"format": "ort", "optimization_level": level, "onnxruntime": ort.__version__, "bytes": len(data),
              "operators": ops, "operator_count": sum(len(v) for d in ops.values() for v in d.values())}
    log.info("ORT format: %d bytes, %d operator types", len(data), report["operator_count"])
    return data, report


def ort_summary(data: bytes, name: str = "the ORT-format file") -> dict:
    """What an ORT-format file tells without running it (read with onnxruntime.tools' flatbuffer
    schema): opsets, operators of the main graph, initializers by dtype (bytes of their raw data;
    string tensors counted by element only), metadata. ORT files carry no per-node metadata, so
    the provenance cora-onnx passes write on nodes is not there."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

    try:
        if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
            raise ValueError("no ORTM file identifier")
        sess = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0)
        model = sess.Model()
        graph = model.Graph()
        names = {v: k for k, v in vars(fbs.TensorDataType.TensorDataType).items() if not k.startswith("_")}
        opsets = {}
        for j in range(model.OpsetImportLength()):
            o = model.OpsetImport(j)
            opsets[(o.Domain() or b"").decode() or "ai.onnx"] = int(o.Version())
        ops: dict[str, int] = {}
        for j in range(graph.NodesLength()):
            n = graph.Nodes(j)
            dom = (n.Domain() or b"").decode()
            key = n.OpType().decode() if dom in ("", "ai.onnx") else f"{dom}.{n.OpType().decode()}"
            ops[key] = ops.get(key, 0) + 1
        used = {"ai.onnx"} | {k.rsplit(".", 1)[0] for k in ops if "." in k}
        opsets = {d: v for d, v in opsets.items() if d in used}
        inits: dict[str, dict] = {}
        external = 0
        for j in range(graph.InitializersLength()):
            t = graph.Initializers(j)
            d = inits.setdefault(names.get(t.DataType(), str(t.DataType())), {"count": 0, "bytes": 0})
            d["count"] += 1
            d["bytes"] += int(t.RawDataLength())
            external += t.ExternalDataOffset() >= 0 and t.RawDataLength() == 0
        meta = {}
        for j in range(model.MetadataPropsLength()):
            e = model.MetadataProps(j)
            meta[(e.Key() or b"").decode()] = (e.Value() or b"").decode()
        ort_version = (sess.OrtVersion() or b"").decode()
    except Exception as exc:  # a truncated or foreign flatbuffer raises anything from struct to IndexError
        raise OnnxModelError(f"cannot read {name} (ORT format): {str(exc).splitlines()[0][:200]}") from None
    init_bytes = sum(v["bytes"] for v in inits.values())
    notes = ["ORT format: the graph as ONNX Runtime optimized it at conversion (fused nodes count as their "
             "ONNX Runtime operators); no per-node provenance from cora-onnx passes (ORT files keep no node metadata)"]
    if external:
        notes.append(f"{external} initializers keep their data outside the flatbuffer; their bytes are not counted")
    return {"format": "ort", "ort_version": ort_version, "opset": opsets, "ops": dict(sorted(ops.items())),
            "initializers": inits, "added_by_passes": [], "metadata": meta,
            "size": {"total": len(data), "initializers": init_bytes, "graph": len(data) - init_bytes},
            "notes": notes}
