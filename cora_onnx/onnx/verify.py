"""ONNX Runtime verification (CPU): predictions, top-1, parity, latency and size. Never
mutates a model. No torch: the PyTorch half (predict_torch) is cora_onnx.torch.verify."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from cora_onnx.onnx.data import ImageSet
from cora_onnx.core.errors import OnnxModelError
from cora_onnx.core.modelfile import ModelFile, read_model
from cora_onnx.core.progress import progress

__all__ = ["session", "predict_onnx", "top1", "parity", "measure_latency", "size_breakdown",
           "load_onnx_bytes", "cpu_threads", "optimized_graph", "InputSpec", "image_input", "run_batch",
           "IMAGE_LAYOUTS"]


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_onnx_bytes(path: str | os.PathLike) -> bytes:
    """Read and validate an ONNX file (parse + checker, external data loaded from the model's
    folder) as one self-contained serialized model: OnnxModelError when it is not one."""
    mf = read_model(path)
    if mf.format != "onnx":
        raise OnnxModelError(f"{mf.path} is an ORT-format file; this needs an ONNX model (.onnx)")
    if mf.data is None:
        raise OnnxModelError(f"{mf.path} with its external data is 2 GB or more: it cannot be held as one "
                             "serialized model")
    return mf.data


IMAGE_LAYOUTS = "N x 3 x H x W (NCHW) or N x H x W x 3 (NHWC)"


@dataclass(frozen=True)
class InputSpec:
    """The image input of a model: name, layout (NCHW or NHWC), the batch size fixed in the file
    (None when symbolic) and the square image size (None when symbolic)."""

    name: str
    layout: str
    batch: int | None
    size: int | None

    @classmethod
    def from_shape(cls, name: str, shape, what: str = "model", elem_type: str | None = None) -> "InputSpec":
        dims = None if shape is None else [d if isinstance(d, int) and d > 0 else None for d in shape]
        if elem_type is not None and elem_type not in ("tensor(float)", "FLOAT"):
            raise OnnxModelError(f"{what}: input {name!r} is {elem_type}; expected float32 images {IMAGE_LAYOUTS}")
        if dims is None or len(dims) != 4:
            raise OnnxModelError(f"{what}: input {name!r} has shape {_fmt_shape(shape)}; expected an image batch "
                                 f"{IMAGE_LAYOUTS}")
        if dims[1] == 3 or (dims[1] is None and dims[3] != 3):
            layout, hw = "NCHW", dims[2:]
        elif dims[3] == 3:
            layout, hw = "NHWC", dims[1:3]
        else:
            raise OnnxModelError(f"{what}: input {name!r} has shape {_fmt_shape(shape)}, not 3 colour channels; "
                                 f"expected an image batch {IMAGE_LAYOUTS}")
        if hw[0] is not None and hw[1] is not None and hw[0] != hw[1]:
            raise OnnxModelError(f"{what}: input {name!r} takes {hw[0]}x{hw[1]} images; cora-onnx feeds square "
                                 f"images ({IMAGE_LAYOUTS} with H = W)")
        return cls(name, layout, dims[0], hw[0] if hw[0] is not None else hw[1])

    def feed(self, x: np.ndarray) -> dict:
        """{input name: x} for a normalized N x 3 x H x W float32 batch, in the model's layout."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return {self.name: np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if self.layout == "NHWC" else x}

    def describe(self) -> str:
        """What the runner does with this input, for the command output."""
        parts = [] if self.layout == "NCHW" else ["NHWC input"]
        if self.batch is not None:
            parts.append(f"batch fixed at {self.batch} in the model: run {self.batch} image"
                         f"{'s' if self.batch > 1 else ''} at a time")
        return "; ".join(parts)


def _fmt_shape(shape) -> str:
    return "unknown" if shape is None else "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def image_input(sess, what: str = "model", strict: bool = True) -> InputSpec:
    """The InputSpec of an ONNX Runtime session (OnnxModelError when it does not take one image
    batch). strict=False takes any first input that is not a 4-D tensor as it is (batch first)."""
    inputs = sess.get_inputs()
    if not strict:
        try:
            return image_input(sess, what)
        except OnnxModelError:
            b = inputs[0].shape[0] if inputs[0].shape else None
            return InputSpec(inputs[0].name, "NCHW", b if isinstance(b, int) and b > 0 else None, None)
    if len(inputs) != 1:
        raise OnnxModelError(f"{what} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); expected one "
                             f"image batch {IMAGE_LAYOUTS}")
    i = inputs[0]
    return InputSpec.from_shape(i.name, i.shape, what, i.type)


def run_batch(sess, spec: InputSpec, x: np.ndarray, outputs=None) -> list:
    """sess.run on one batch; a batch the model cannot take is an OnnxModelError (one line)."""
    try:
        return sess.run(outputs, spec.feed(x))
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise OnnxModelError(f"ONNX Runtime cannot run the model on a batch of shape {list(x.shape)} "
                             f"({spec.layout}): {msg[:240]}") from None


def session(model: bytes | str | os.PathLike | ModelFile, *, optimize: bool = True, threads: int | None = None,
            fold_weight_dq: bool = False):
    """A CPU InferenceSession. optimize=False turns graph optimizations off (bit-exact checks);
    fold_weight_dq sets session.disable_quant_qdq=1 so constant weight DequantizeLinear nodes are
    folded at load (float-speed kernels, but no int8 fusions)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if fold_weight_dq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    src = model.source if isinstance(model, ModelFile) else model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        what = f"{model.path}" if isinstance(model, ModelFile) else "the model"
        raise OnnxModelError(f"ONNX Runtime cannot load {what}: {str(exc).splitlines()[0][:300]}") from None


def predict_onnx(sess, images: ImageSet, batch_size: int = 32, desc: str = "onnxruntime") -> np.ndarray:
    """First output of the model on every image. A model whose batch size is fixed in the file
    runs at that batch (the last chunk padded with copies of its last image, outputs dropped);
    an NHWC model gets its images transposed."""
    spec = image_input(sess, strict=False)
    if spec.batch is not None:
        batch_size = spec.batch
    n = (len(images) + batch_size - 1) // batch_size
    outs = []
    for x in progress(images.batches(batch_size), n, desc, "batches"):
        k = x.shape[0]
        if spec.batch is not None and k < spec.batch:
            x = np.concatenate([x, np.repeat(x[-1:], spec.batch - k, axis=0)])
        outs.append(run_batch(sess, spec, x)[0][:k])
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels) -> float:
    """Percent of argmax == label."""
    labels = np.asarray(labels)
    return float((logits.argmax(axis=1) == labels).mean() * 100.0)


def parity(a: np.ndarray, b: np.ndarray) -> dict:
    """Max abs logit difference, the same relative to the largest |logit| of the reference b, and
    top-1 agreement (percent) between two runs on the same images."""
    err = float(np.abs(a - b).max())
    return {"max_abs_error": err, "relative_max_error": err / max(float(np.abs(b).max()), 1e-12),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean() * 100.0),
            "images": int(a.shape[0])}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def fidelity(logits: np.ndarray, reference: np.ndarray) -> dict:
    """How closely a compressed model follows its float reference on the same images: top-1
    agreement (percent) and the mean KL divergence KL(reference || model) of the softmax outputs
    (nats). Unlike top-1 accuracy on a small labelled set, neither needs labels and neither moves
    by whole images, so small differences between methods show."""
    ref, own = _log_softmax(reference), _log_softmax(logits)
    return {"top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean() * 100.0),
            "kl_divergence": float((np.exp(ref) * (ref - own)).sum(axis=1).mean()),
            "images": int(logits.shape[0])}


def measure_latency(models: Mapping[str, object], input_shape: Sequence[int], *, batch_sizes: Sequence[int] = (1,),
                    warmup: int = 5, runs: int = 30, threads: int | None = None, seed: int = 0) -> dict:
    """Latency of several models in one interleaved run (round robin, so drift hits all alike).

    models: name -> ONNX bytes/path or an existing InferenceSession. Returns
    {name: {"batch_<n>": {"median_ms", "p10_ms", "p90_ms", "runs"}}, "threads": t}.
    """
    threads = threads or cpu_threads()
    sessions = {k: (v if hasattr(v, "run") else session(v, threads=threads)) for k, v in models.items()}
    rng = np.random.default_rng(seed)
    result: dict = {k: {} for k in sessions}
    for bs in batch_sizes:
        x = rng.standard_normal((bs, *input_shape), dtype=np.float32)
        feeds = {}
        for k, s in sessions.items():
            i = s.get_inputs()[0]
            fixed = i.shape[0] if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 else None
            if fixed is not None and fixed != bs:
                raise OnnxModelError(f"{k}: the model's batch size is fixed at {fixed} in the file; it cannot run "
                                     f"batch {bs}")
            feeds[k] = {i.name: x}
            try:
                s.run(None, feeds[k])
            except Exception as exc:
                raise OnnxModelError(f"{k}: ONNX Runtime cannot run the model on an input of shape {list(x.shape)}: "
                                     f"{' '.join(str(exc).split())[:240]}") from None
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(warmup):
            for k, s in sessions.items():
                s.run(None, feeds[k])
        for _ in range(runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t0) * 1000.0)
        for k, ts in times.items():
            q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
            result[k][f"batch_{bs}"] = {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1],
                                        "runs": len(ts)}
    result["threads"] = threads
    return result


def size_breakdown(model: bytes | str | Path) -> dict:
    """Bytes on disk by kind: integer weights, float weights, quantization parameters
    (scales/zero points), other initializers, and graph structure (the rest of the file)."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    proto = onnx.load_from_string(data)
    out = {"total": len(data), "integer_weights": 0, "float_weights": 0, "quant_params": 0, "other": 0}
    ints = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
            onnx.TensorProto.UINT16}  # UINT16: product-quantization codes with more than 256 codewords
    if hasattr(onnx.TensorProto, "INT2"):
        ints |= {onnx.TensorProto.INT2, onnx.TensorProto.UINT2}
    for t in proto.graph.initializer:
        n = len(t.raw_data) if t.raw_data else t.ByteSize()
        if t.name.endswith(("_scale", "_zero_point")):
            out["quant_params"] += n
        elif t.data_type in ints:
            out["integer_weights"] += n
        elif t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) >= 1:
            out["float_weights"] += n
        else:
            out["other"] += n
    out["graph"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def optimized_graph(model_bytes: bytes):
    """The graph ONNX Runtime's CPU session runs after its optimizer (level ALL), as an onnx.ModelProto."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        return onnx.load(path, load_external_data=False)
