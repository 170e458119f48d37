"""The PyTorch half of verification (the ONNX Runtime half, with the figures and the limits, is
cora_onnx.onnx.verify and needs no torch): logits of a torch model on an image set, which kind of
reference a quantized file is checked against, the tensor-by-tensor check of integer activations
against their simulation, and the diagnosis of a failed check (`first_divergent_layer`: on a few
images, the first Conv/Gemm whose output in ONNX Runtime differs from the same layer's output in
PyTorch; the Conv outputs are exposed as extra graph outputs of a copy of the model, the torch
modules are hooked)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from cora_onnx.core.progress import progress
from cora_onnx.core.records import to_json
from cora_onnx.onnx.data import ImageSet
from cora_onnx.onnx.verify import (PARITY_LIMITS, TensorCheck, Verdict, activation_grid_in, activation_integers,
                                   compare_tensors, gated_sigmoids, integer_biases, judge, layer_outputs, parity, predict_onnx,
                                   producing_layers, session)
from cora_onnx.torch.export import AdaptedConv
from cora_onnx.torch.images import TorchImages, as_torch
from cora_onnx.torch.simulate import ActivationQuantSim

__all__ = ["predict_torch", "reference_kind", "simulation", "FileCheck", "check_file", "failure_message",
           "tensor_check", "layer_errors", "first_divergent_layer", "PROBE_IMAGES"]

log = logging.getLogger(__name__)

PROBE_IMAGES = 8  # images on which the tensor-by-tensor check (and a failed check's diagnosis) compare


def predict_torch(model, images: ImageSet | TorchImages, batch_size: int = 32, desc: str = "pytorch") -> np.ndarray:
    """The model's output on every image (eval mode, inference), as float32 numpy. Batches go in as
    channels-last memory: CPU convolutions then take their faster kernels
    (tools/bench_channels_last.py)."""
    n = (len(images) + batch_size - 1) // batch_size
    model.eval()
    with torch.inference_mode():
        outs = [model(x.contiguous(memory_format=torch.channels_last)).float().numpy()
                for x in progress(as_torch(images).batches(batch_size), n, desc, "batches")]
    return np.concatenate(outs)


def reference_kind(integer_activations: bool, qmodel: nn.Module) -> str:
    """The key of cora_onnx.onnx.verify.PARITY_LIMITS for a file and the model it is checked against."""
    if not integer_activations:
        return "exact"
    return "simulated" if isinstance(qmodel, ActivationQuantSim) else "float_activations"


def simulation(program, weights: nn.Module, quant_bytes: bytes) -> nn.Module:
    """The PyTorch reference of a file with integer activations: the simulation of its activation
    grid (the QuantizeLinear scales and zero points in the file) and of its INT32 biases on the
    exported program of the float model, with `weights` (the plan's, cora_onnx.torch.export.
    apply_plan_torch). With adapters as branches (which only the ONNX graph has) `weights` itself,
    at float activations."""
    if any(isinstance(m, AdaptedConv) for m in weights.modules()):
        return weights
    proto = onnx.load_from_string(quant_bytes)
    qparams, act_range, shared = activation_grid_in(proto)
    return ActivationQuantSim(program, weights, qparams, act_range, biases=integer_biases(proto), shared=shared,
                              gates=gated_sigmoids(proto))


@dataclass(frozen=True, eq=False)
class FileCheck:
    """A file checked against its PyTorch reference on images: the verdict, the reference kind
    (PARITY_LIMITS), ONNX Runtime's and the reference's outputs, and the normalized probe images
    the tensor-by-tensor check (and a failure's diagnosis) compare on."""

    verdict: Verdict
    kind: str
    logits: np.ndarray
    reference: np.ndarray
    probe: torch.Tensor


def check_file(quant_bytes: bytes, reference: nn.Module, images: ImageSet, integer_activations: bool, *,
               sess=None, batch_size: int = 32, threads: int | None = None,
               float_logits: np.ndarray | None = None) -> FileCheck:
    """Check the ONNX file `quant_bytes` (its session `sess` when open) against `reference` (the
    quantized PyTorch model, or with integer activations its simulation) on `images`: parity,
    the tensor-by-tensor check with the simulation, constant outputs (cora_onnx.onnx.verify.judge).
    float_logits: the float model's outputs on the same images, for the message."""
    sess = sess if sess is not None else session(quant_bytes, threads=threads)
    ort = predict_onnx(sess, images, batch_size, "ONNX Runtime, quantized")
    ref = predict_torch(reference, images, batch_size, "PyTorch, quantized")
    # the images the tensor and layer checks compare on: those the two runs disagree on first
    order = np.argsort((ort.argmax(1) == ref.argmax(1)).astype(np.int8), kind="stable")[:PROBE_IMAGES]
    probe = torch.from_numpy(images.preprocess.normalize(images.images[np.sort(order)]))
    kind = reference_kind(integer_activations, reference)
    tensors = tensor_check(quant_bytes, reference, probe, threads) if kind == "simulated" else None
    return FileCheck(judge(parity(ort, ref), kind, ort, tensors, float_logits), kind, ort, ref, probe)


def failure_message(check: FileCheck, quant_bytes: bytes, reference: nn.Module, layers: list[str], kept: str, *,
                    subject: str = "the PyTorch model", images: str = "images",
                    threads: int | None = None) -> tuple[str, dict | None]:
    """The one-line message of a failed check (`kept`: where the file is now) and where the file
    diverges (the report's parity_layer, None when unknown): with integer activations the first
    tensor over the limits (already named in the failure), otherwise the first of `layers` whose
    Conv/Gemm output in ONNX Runtime differs from the reference's, on the probe images."""
    v = check.verdict
    par, t = v.parity, v.parity.tensors
    if v.constant_output:
        return f"not verified: {v.failure}; {kept}", None
    disagree = (f"ONNX Runtime disagrees with {subject} on {par.images} {images} (top-1 agreement "
                f"{par.top1_agreement:.2f}%): {v.failure}")
    if t is not None and t.first_over is not None and t.instrumented_exact:
        return f"{disagree}; {kept}", {**to_json(t.first_over), "diverged": True}
    where = None
    try:
        where = first_divergent_layer(quant_bytes, reference, layers, check.probe, check.kind, threads or 1)
    except Exception as exc:  # the diagnosis must not hide the failure itself
        log.warning("could not compare the layers' outputs: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
    if where is None:
        return f"{disagree}; no layer output could be compared; {kept}", None
    said = f"first diverging layer: {where[0]} (relative error {where[1]:.3g} on {len(check.probe)} images)" \
        if where[2] else f"no single layer diverges; largest layer error at {where[0]} ({where[1]:.3g})"
    return f"{disagree}; {said}; {kept}", {"layer": where[0], "relative_error": where[1], "diverged": where[2]}


def tensor_check(quant_bytes: bytes, sim: ActivationQuantSim, x: torch.Tensor, threads: int | None = None) -> TensorCheck:
    """Integer activations in ONNX Runtime against their simulation on the images x, tensor by
    tensor: each quantized tensor of the simulation is computed from ONNX Runtime's integers of the
    tensors before it, so a difference is local to one layer (rounding at a .5 boundary, or a
    wrong layer) instead of the sum of all roundings upstream, which near-tie images amplify."""
    plain, inst, ints = activation_integers(quant_bytes, list(sim.qparams), x.numpy(), threads)
    out, own = sim.run(x, force=ints)
    check = compare_tensors(ints, own, inst, out.float().numpy(), plain, PARITY_LIMITS["simulated"])
    if check.first_over is None:
        return check
    t = check.first_over.tensor
    layer = producing_layers(onnx.load_from_string(quant_bytes), [t]).get(t)
    return dataclasses.replace(check, first_over=dataclasses.replace(check.first_over, layer=layer))


def _torch_layer_outputs(qmodel: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    got: dict[str, torch.Tensor] = {}
    if isinstance(qmodel, ActivationQuantSim):
        qmodel.capture = got
        try:
            with torch.inference_mode():
                qmodel(x)
        finally:
            qmodel.capture = None
    else:
        handles = []
        for name in layers:
            try:
                mod = qmodel.get_submodule(name)
            except AttributeError:
                continue
            mod = mod.conv if isinstance(mod, AdaptedConv) else mod  # the Conv without its branch, as in ONNX
            handles.append(mod.register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o.detach().clone())))
        try:
            with torch.inference_mode():
                qmodel(x)
        finally:
            for h in handles:
                h.remove()
    return {k: v.detach().float().numpy() for k, v in got.items() if k in layers}


def layer_errors(quant_bytes: bytes, qmodel: nn.Module, layers: list[str], x: torch.Tensor,
                 threads: int = 1) -> list[tuple[str, float]]:
    """(layer, relative L2 error of its Conv/Gemm output, ONNX Runtime vs PyTorch) in graph order."""
    from cora_onnx.onnx.verify import session

    proto = onnx.load_from_string(quant_bytes)
    names = layer_outputs(proto, set(layers))
    graph_outputs = {o.name for o in proto.graph.output}
    for layer, value in names.items():
        if value not in graph_outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
    sess = session(proto.SerializeToString(), threads=threads)
    outs = sess.run(list(names.values()), {sess.get_inputs()[0].name: x.numpy()})
    ref = _torch_layer_outputs(qmodel, layers, x)
    errors = []
    for (layer, _), got in zip(names.items(), outs):
        want = ref.get(layer)
        if want is None or want.shape != got.shape:
            continue
        errors.append((layer, float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))))
    return errors


def first_divergent_layer(quant_bytes: bytes, qmodel: nn.Module, layers: list[str], x: torch.Tensor, kind: str,
                          threads: int = 1) -> tuple[str, float, bool] | None:
    """(layer, relative error, diverged) of the first layer over PARITY_LIMITS[kind].layer_error, or
    of the largest error when none is over (diverged False); None when no layer could be compared."""
    errors = layer_errors(quant_bytes, qmodel, layers, x, threads)
    if not errors:
        return None
    limit = PARITY_LIMITS[kind].layer_error
    for layer, err in errors:
        if err > limit:
            return layer, err, True
    layer, err = max(errors, key=lambda e: e[1])
    return layer, err, False
