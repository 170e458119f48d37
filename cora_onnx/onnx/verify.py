"""ONNX Runtime verification (CPU): predictions, top-1, parity, latency and size. Never
mutates a model. No torch: the PyTorch half (predict_torch) is cora_onnx.torch.verify."""

from __future__ import annotations

import dataclasses
import os
import re
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
from cora_onnx.core.progress import Progress, progress
from cora_onnx.core.records import Record, key, optional

__all__ = ["session", "predict_onnx", "top1", "parity", "fidelity", "measure_latency", "size_breakdown",
           "load_onnx_bytes", "cpu_threads", "optimized_graph", "InputSpec", "image_input", "run_batch",
           "IMAGE_LAYOUTS", "ParityLimits", "PARITY_LIMITS", "parity_failure", "TensorCheck", "TensorDiff", "Parity",
           "Fidelity", "SizeBreakdown", "Verdict", "compare_tensors",
           "activation_integers", "quantized_tensor_outputs", "output_spread", "is_constant", "CONSTANT_SPREAD",
           "failed_path", "judge", "weight_layer", "layer_outputs", "producing_layers", "integer_biases", "activation_grid_in", "gated_sigmoids"]


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
        with Progress("ONNX Runtime session (load and graph optimization)", quiet_end=True):
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


@dataclass(frozen=True)
class TensorDiff:
    """One quantized tensor, ONNX Runtime against the simulation: the share of its values that
    differ, the largest difference in quantization steps, and the planned layer that computes it
    (None when it is not a planned layer's output, or not looked up)."""

    tensor: str
    mismatch: float
    max_steps: int
    layer: str | None = optional()


@dataclass(frozen=True)
class TensorCheck:
    """Integer activations in ONNX Runtime against their simulation, each quantized tensor of the
    simulation computed from ONNX Runtime's values of the tensors before it (teacher forcing), on
    a few images. tensors: how many were compared; worst: the tensor furthest off (steps, then
    share; None: all equal); first_over: the first tensor in graph order over the limits (None:
    none); output_error: relative L2 error of the float outputs computed from ONNX Runtime's last
    tensors; instrumented_exact: whether exposing the tensors left ONNX Runtime's outputs unchanged
    (False: the check does not describe the plain session, and the end-to-end limits apply)."""

    tensors: int
    images: int
    worst: TensorDiff | None
    first_over: TensorDiff | None
    output_error: float = key("output_relative_error")
    instrumented_exact: bool = True


@dataclass(frozen=True)
class ParityLimits:
    """What the ONNX Runtime file may differ from its PyTorch reference by, per kind of reference.

    relative_error: largest max |logit difference| over the largest |reference logit|, end to end
    (None: not a criterion); agreement: least top-1 agreement in percent (None: not a criterion:
    images whose two best logits nearly tie flip under any rounding difference); layer_error:
    relative L2 error above which a layer's output counts as diverged (the diagnosis of a failure);
    tensor_steps / tensor_mismatch / output_error (integer activations against their simulation,
    each quantized tensor computed from ONNX Runtime's values of the tensors before it): the
    largest difference in quantization steps, the largest share of a tensor's values that may
    differ (by rounding), and the largest relative L2 error of the float outputs."""

    relative_error: float | None
    layer_error: float
    agreement: float | None = None
    tensor_steps: int | None = None
    tensor_mismatch: float | None = None
    output_error: float | None = None


# Measured on correct files (docs/verification.md, tools/measure_parity.py). A wrong weight gives
# end-to-end relative errors near 1 and, against the simulation, tensors off by many steps.
PARITY_LIMITS = {
    # weight-only models: PyTorch runs exactly the dequantized weights; only float rounding differs
    "exact": ParityLimits(relative_error=1e-3, layer_error=1e-3),
    # integer activations vs the PyTorch simulation of the same activation grid and INT32 biases,
    # tensor by tensor (teacher-forced): only float vs integer accumulation can round differently
    # at a .5 boundary (see docs/verification.md for what correct files measure)
    "simulated": ParityLimits(relative_error=None, layer_error=0.1, tensor_steps=1, tensor_mismatch=0.02,
                              output_error=1e-3),
    # integer activations with adapter branches vs PyTorch with float activations (no simulation
    # of the branches): end to end, lenient
    "float_activations": ParityLimits(relative_error=0.5, layer_error=0.25, agreement=90.0),
}


@dataclass(frozen=True)
class Parity(Record):
    """ONNX Runtime against its PyTorch reference on the same images: max |logit difference|, the
    same relative to the largest |reference logit|, top-1 agreement (percent), the images; with the
    verdict (cora_onnx.onnx.verify.judge): the reference kind and its limits, the output spread
    (0: the outputs do not depend on the input) and, with integer activations against their
    simulation, the tensor-by-tensor check."""

    max_abs_error: float
    relative_max_error: float
    top1_agreement: float
    images: int
    reference: str | None = optional()
    limits: ParityLimits | None = optional()
    output_spread: float | None = optional()
    tensors: TensorCheck | None = optional()


def parity(a: np.ndarray, b: np.ndarray) -> Parity:
    """Max abs logit difference, the same relative to the largest |logit| of the reference b, and
    top-1 agreement (percent) between two runs on the same images."""
    err = float(np.abs(a - b).max())
    return Parity(err, err / max(float(np.abs(b).max()), 1e-12), float((a.argmax(1) == b.argmax(1)).mean() * 100.0),
                  int(a.shape[0]))


CONSTANT_SPREAD = 1e-6  # output spread over images, relative to the largest |output|, at or below which it is constant


def output_spread(logits: np.ndarray) -> float | None:
    """How much a model's outputs depend on its input: the largest range over the images of one
    output (max - min of a column), relative to the largest |output| (0 when every output is 0 on
    every image). None with fewer than 2 images. At or below CONSTANT_SPREAD the outputs are
    constant: the model ignores its input (all-zero logits, a dead layer)."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    if x.shape[0] < 2:
        return None
    top = float(np.abs(x).max())
    return float(np.ptp(x, axis=0).max()) / top if top > 0 else 0.0


def is_constant(spread: float | None) -> bool:
    return spread is not None and spread <= CONSTANT_SPREAD


def compare_tensors(ort: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], ort_out: np.ndarray,
                    ref_out: np.ndarray, plain_out: np.ndarray, limits: ParityLimits) -> TensorCheck:
    """The TensorCheck of ONNX Runtime's integers `ort` (tensor -> array, in graph order) against
    the simulation's `ref` computed from them; outputs: ONNX Runtime instrumented (ort_out) and
    plain (plain_out), the simulation's (ref_out)."""
    worst = first = None
    n = 0
    for name, got in ort.items():
        want = ref.get(name)
        if want is None or want.size == 0 or want.shape != got.shape:
            continue
        n += 1
        d = np.abs(got.astype(np.int64) - want.astype(np.int64))
        entry = TensorDiff(name, float(np.count_nonzero(d)) / d.size, int(d.max()))
        if entry.max_steps > 0 and (worst is None or (entry.max_steps, entry.mismatch) >
                                    (worst.max_steps, worst.mismatch)):
            worst = entry
        if first is None and (entry.max_steps > limits.tensor_steps or entry.mismatch > limits.tensor_mismatch):
            first = entry
    ref_out = np.asarray(ref_out, np.float64)
    out_err = float(np.linalg.norm(ort_out - ref_out) / max(float(np.linalg.norm(ref_out)), 1e-30))
    exact = bool(np.allclose(ort_out, plain_out, rtol=1e-6, atol=1e-6 * float(np.abs(plain_out).max())))
    return TensorCheck(n, int(ort_out.shape[0]), worst, first, out_err, exact)


def parity_failure(par: Parity, kind: str, tensors: TensorCheck | None = None) -> str | None:
    """None when the parity figures are within PARITY_LIMITS[kind], else what is out (one phrase).
    With integer activations against the simulation (`tensors` given and describing the plain
    session) the tensor-by-tensor check decides; else the end-to-end figures."""
    lim = PARITY_LIMITS[kind]
    if tensors is not None and tensors.instrumented_exact and lim.tensor_steps is not None:
        out = []
        t = tensors.first_over
        if t is not None:
            src = f" (output of layer {t.layer})" if t.layer else ""
            out.append(f"tensor {t.tensor}{src} differs from the simulation on {t.mismatch * 100:.2f}% of its values, "
                       f"by up to {t.max_steps} quantization steps (limits {lim.tensor_mismatch * 100:g}%, "
                       f"{lim.tensor_steps} step), computed from ONNX Runtime's own inputs on {tensors.images} images")
        if tensors.output_error > lim.output_error:
            out.append(f"the outputs computed from ONNX Runtime's last tensors differ by {tensors.output_error:.3g} "
                       f"(relative L2 > {lim.output_error:g})")
        return "; ".join(out) or None
    fallback = PARITY_LIMITS["float_activations"] if lim.relative_error is None else lim
    out = []
    if fallback.agreement is not None and par.top1_agreement < fallback.agreement:
        out.append(f"top-1 agreement {par.top1_agreement:.2f}% < {fallback.agreement:g}%")
    if par.relative_max_error > fallback.relative_error:
        out.append(f"max logit difference {par.max_abs_error:.4g} ({par.relative_max_error:.3g} of the largest "
                   f"logit > {fallback.relative_error:g})")
    return "; ".join(out) or None


@dataclass(frozen=True)
class Verdict:
    """The check of one file: the parity figures with the reference kind, its limits, the output
    spread and the tensor check; why the file fails (None: verified); whether the failure is that
    its outputs do not depend on the input."""

    parity: Parity
    failure: str | None
    constant_output: bool = False

    @property
    def verified(self) -> bool:
        return self.failure is None


def judge(par: Parity, kind: str, logits: np.ndarray, tensors: TensorCheck | None = None,
          float_logits: np.ndarray | None = None) -> Verdict:
    """The verdict on a file from its parity figures `par` against a reference of `kind`
    (PARITY_LIMITS). logits: ONNX Runtime's outputs on the parity images; float_logits: the float
    model's on the same images, for the message."""
    spread = output_spread(logits)
    par = dataclasses.replace(par, reference=kind, limits=PARITY_LIMITS[kind], output_spread=spread, tensors=tensors)
    if is_constant(spread):
        also = "; so does the float model" if float_logits is not None and is_constant(output_spread(float_logits)) \
            else ""
        return Verdict(par, f"the model's outputs do not depend on its input: ONNX Runtime gives the same outputs on "
                            f"all {len(logits)} images (spread {spread:.3g} of the largest |output| "
                            f"{float(np.abs(logits).max()):.3g}){also}", True)
    return Verdict(par, parity_failure(par, kind, tensors))


def quantized_tensor_outputs(proto: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, tuple[str, int]]:
    """tensor -> (name, ONNX element type) of the QuantizeLinear output that carries its integers
    (`<tensor>_quantized`, as ActivationQDQPass names them), for the tensors that have one."""
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    produced = {}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            produced[node.output[0]] = inits.get(node.input[2], onnx.TensorProto.UINT8)
    return {t: (f"{t}_quantized", produced[f"{t}_quantized"]) for t in tensors if f"{t}_quantized" in produced}


_WEIGHT = re.compile(r"^(?P<layer>.+)\.(?:weight(?:_[A-Za-z0-9_]+)?|adapter_merge_dequantized)$")


def weight_layer(node: onnx.NodeProto) -> str | None:
    """The planned layer whose weight a Conv/Gemm/MatMul node computes with (from the weight's
    name: `<layer>.weight`, `<layer>.weight_dequantized`, ...), else None."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return None
    m = _WEIGHT.match(node.input[1])
    return m.group("layer") if m else None


def layer_outputs(proto: onnx.ModelProto, layers: set[str]) -> dict[str, str]:
    """Layer name -> output name of the Conv/Gemm whose weight comes from that layer, in graph order."""
    out = {}
    for node in proto.graph.node:
        layer = weight_layer(node)
        if layer in layers and layer not in out:
            out[layer] = node.output[0]
    return out


def producing_layers(proto: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, str]:
    """tensor -> the planned layer whose output its activation QuantizeLinear quantizes, for the
    tensors a Conv/Gemm/MatMul with a planned weight computes."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for t in tensors:
        q = producer.get(f"{t}_quantized")
        src = producer.get(q.input[0]) if q is not None else None
        layer = weight_layer(src) if src is not None else None
        if layer is not None:
            out[t] = layer
    return out


def activation_grid_in(proto: onnx.ModelProto) -> tuple[dict[str, tuple[float, int]], tuple[int, int], set[str]]:
    """The grid a simulation of the file's integer activations must round to: tensor -> (scale,
    zero point) of every activation QuantizeLinear ActivationQDQPass wrote in the file (its
    provenance names the tensor), the integer range of their type (uint8 or int8), and the tensors
    that share another's parameters through a data-movement op."""
    inits = {t.name: t for t in proto.graph.initializer}
    out, shared, signed = {}, set(), False
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type != "QuantizeLinear" or meta.get("cora_onnx.pass") != "ActivationQDQPass" \
                or "cora_onnx.tensor" not in meta or len(node.input) < 3:
            continue
        if node.input[1] in inits and node.input[2] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            tensor = meta["cora_onnx.tensor"]
            out[tensor] = (float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]))
            signed = zp.dtype == np.int8
            if meta.get("cora_onnx.shared_with"):
                shared.add(tensor)
    return out, ((-128, 127) if signed else (0, 255)), shared


def gated_sigmoids(proto: onnx.ModelProto) -> dict[str, str]:
    """x * sigmoid(x) (SiLU / Swish) that the exporter wrote as Sigmoid -> Mul: the Mul's output
    (named after the program's one silu node) -> the Sigmoid's output (a value of the ONNX graph
    only), through any QuantizeLinear / DequantizeLinear between them. A simulation that quantizes
    the Sigmoid's output must split that node there."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def source(t: str) -> str:  # the tensor behind any Q/DQ chain
        while t in producer and producer[t].op_type in ("QuantizeLinear", "DequantizeLinear"):
            t = producer[t].input[0]
        return t

    def users(t: str) -> list:  # the nodes reading t, through any Q/DQ chain
        out = []
        for n in consumers.get(t, []):
            out += users(n.output[0]) if n.op_type in ("QuantizeLinear", "DequantizeLinear") else [n]
        return out

    out = {}
    for s in proto.graph.node:
        if s.op_type != "Sigmoid":
            continue
        x, t = source(s.input[0]), s.output[0]
        muls = [m for m in users(t) if m.op_type == "Mul" and len(m.input) == 2]
        if len(muls) == 1 and sorted(source(i) for i in muls[0].input) == sorted((x, t)):
            out[muls[0].output[0]] = t
    return out


def integer_biases(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """layer -> the bias ONNX Runtime's integer kernel adds (its INT32 grid times its scale, input
    scale x weight scale), for every Conv/Gemm of a planned layer whose bias is a DequantizeLinear
    of an INT32 initializer: what a simulation must add to round where ONNX Runtime does."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for node in proto.graph.node:
        layer = weight_layer(node)
        dq = producer.get(node.input[2]) if layer is not None and len(node.input) > 2 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        q = inits[dq.input[0]]
        if q.data_type != onnx.TensorProto.INT32:
            continue
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        out[layer] = (onnx.numpy_helper.to_array(q).astype(np.float64) * scale).astype(np.float32)
    return out


def activation_integers(model_bytes: bytes, tensors: Sequence[str], x: np.ndarray,
                        threads: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Run the model on x (N x 3 x H x W) twice in ONNX Runtime: as it is, and with the integers of
    `tensors` (activation QuantizeLinear outputs) exposed as graph outputs. Returns (first output
    plain, first output instrumented, {tensor: integers} in graph order)."""
    proto = onnx.load_from_string(model_bytes)
    outs = quantized_tensor_outputs(proto, tensors)
    order = {n.output[0]: i for i, n in enumerate(proto.graph.node) if n.output}
    names = sorted(outs, key=lambda t: order.get(outs[t][0], 0))
    existing = {o.name for o in proto.graph.output}
    for t in names:
        if outs[t][0] not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(outs[t][0], outs[t][1], None))
    plain = session(model_bytes, threads=threads)
    spec = image_input(plain, strict=False)
    plain_out = run_batch(plain, spec, x)[0]
    inst = session(proto.SerializeToString(), threads=threads)
    got = run_batch(inst, spec, x, [inst.get_outputs()[0].name] + [outs[t][0] for t in names])
    return plain_out, got[0], dict(zip(names, got[1:]))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Fidelity(Record):
    """How closely a compressed model follows its float reference on the same images: top-1
    agreement (percent) and the mean KL divergence KL(reference || model) of the softmax outputs
    (nats)."""

    top1_agreement: float
    kl_divergence: float
    images: int


def fidelity(logits: np.ndarray, reference: np.ndarray) -> Fidelity:
    """The Fidelity of `logits` to `reference` (the float model's logits on the same images).
    Unlike top-1 accuracy on a small labelled set, neither figure needs labels and neither moves
    by whole images, so small differences between methods show."""
    ref, own = _log_softmax(reference), _log_softmax(logits)
    return Fidelity(float((logits.argmax(1) == reference.argmax(1)).mean() * 100.0),
                    float((np.exp(ref) * (ref - own)).sum(axis=1).mean()), int(logits.shape[0]))


def measure_latency(models: Mapping[str, object], input_shape: Sequence[int], *, batch_sizes: Sequence[int] = (1,),
                    warmup: int = 5, runs: int = 30, threads: int | None = None, seed: int = 0) -> dict:
    """Latency of several models in one interleaved run: each round runs every model once, in a
    new random order (drift hits all alike, and no model always follows the same one: a fixed
    order favoured or penalized a model by what ran before it, 10-15% on identical graphs).

    models: name -> ONNX bytes/path or an existing InferenceSession. Returns
    {name: {"batch_<n>": {"median_ms", "p10_ms", "p90_ms", "runs"}}, "threads": t}.
    """
    threads = threads or cpu_threads()
    sessions = {k: (v if hasattr(v, "run") else session(v, threads=threads)) for k, v in models.items()}
    rng = np.random.default_rng(seed)
    result: dict = {k: {} for k in sessions}
    rounds = len(batch_sizes) * (warmup + runs)
    with Progress(f"latency of {len(sessions)} model{'s' if len(sessions) != 1 else ''}", rounds,
                  "rounds (one run of each model)", quiet_end=True) as p:
        for bs in batch_sizes:
            _time_batch(sessions, bs, rng.standard_normal((bs, *input_shape), dtype=np.float32), warmup, runs,
                        result, p, rng)
    result["threads"] = threads
    return result


def _time_batch(sessions: dict, bs: int, x: np.ndarray, warmup: int, runs: int, result: dict, p: Progress,
                rng: np.random.Generator) -> None:
    """measure_latency at one batch size: result[name]["batch_<bs>"]."""
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
        p.advance()
    names = list(sessions)
    for _ in range(runs):
        for k in (names[i] for i in rng.permutation(len(names))):
            s = sessions[k]
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1000.0)
        p.advance()
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        result[k][f"batch_{bs}"] = {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1],
                                    "runs": len(ts)}


@dataclass(frozen=True)
class SizeBreakdown(Record):
    """Bytes of an ONNX file by kind: integer weights, float weights, quantization parameters
    (scales / zero points), other initializers, and graph structure (the rest of the file)."""

    total: int
    integer_weights: int = 0
    float_weights: int = 0
    quant_params: int = 0
    other: int = 0
    graph: int = 0


def size_breakdown(model: bytes | str | Path) -> SizeBreakdown:
    """The SizeBreakdown of an ONNX file (bytes or path)."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    proto = onnx.load_from_string(data)
    out = {"integer_weights": 0, "float_weights": 0, "quant_params": 0, "other": 0}
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
    return SizeBreakdown(total=len(data), graph=len(data) - sum(out.values()), **out)


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


def failed_path(out: str | os.PathLike) -> Path:
    """Where a model that failed its verification is kept: NAME.failed.onnx beside NAME.<ext>."""
    out = Path(out)
    return out.with_name(f"{out.stem}.failed.onnx")
