"""The parity gate: is the ONNX file the same network as the PyTorch model it came from?

`parity_failure` compares the figures of cora_onnx.onnx.verify.parity with limits measured per kind of
reference (see PARITY_LIMITS); `first_divergent_layer` finds, on a few images, the first Conv/Gemm
whose output in ONNX Runtime differs from the same layer's output in PyTorch (the Conv outputs are
exposed as extra graph outputs of a copy of the model; the torch modules are hooked). Torch side.
"""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from cora_onnx.torch.export import AdaptedConv
from cora_onnx.torch.simulate import ActivationQuantSim

__all__ = ["ParityLimits", "PARITY_LIMITS", "reference_kind", "parity_failure", "layer_errors",
           "first_divergent_layer", "failed_path"]


@dataclass(frozen=True)
class ParityLimits:
    """agreement: least top-1 agreement (percent); relative_error: largest max |logit difference|
    over the largest |reference logit|; layer_error: relative L2 error above which a layer's output
    counts as diverged."""

    agreement: float
    relative_error: float
    layer_error: float


# Measured on the digits ConvNet, its dynamic-padding variant and EfficientNet-Lite0 (see the
# docs/verification.md and tools/check_dynamic_lite0.py). A wrong weight gives relative errors near 1.
PARITY_LIMITS = {
    # weight-only models: PyTorch runs exactly the dequantized weights; only float rounding differs
    "exact": ParityLimits(agreement=99.0, relative_error=1e-3, layer_error=1e-3),
    # integer activations vs the PyTorch simulation of the same activation grid. The simulation
    # rounds in float where ONNX Runtime's integer kernels requantize, so images whose two best
    # logits nearly tie flip: a correct ResNet-18 W8A8 (1000 classes, 500 images) measured 97.8%
    # agreement with a relative logit error of 0.024. A wrong layer gives relative errors near 1.
    "simulated": ParityLimits(agreement=95.0, relative_error=0.25, layer_error=0.1),
    # integer activations with adapter branches vs PyTorch with float activations
    "float_activations": ParityLimits(agreement=90.0, relative_error=0.5, layer_error=0.25),
}


def reference_kind(integer_activations: bool, qmodel: nn.Module) -> str:
    if not integer_activations:
        return "exact"
    return "simulated" if isinstance(qmodel, ActivationQuantSim) else "float_activations"


def parity_failure(par: dict, kind: str) -> str | None:
    """None when the parity figures are within PARITY_LIMITS[kind], else what is out (one phrase)."""
    lim = PARITY_LIMITS[kind]
    out = []
    if par["top1_agreement"] < lim.agreement:
        out.append(f"top-1 agreement {par['top1_agreement']:.2f}% < {lim.agreement:g}%")
    if par["relative_max_error"] > lim.relative_error:
        out.append(f"max logit difference {par['max_abs_error']:.4g} ({par['relative_max_error']:.3g} of the largest "
                   f"logit > {lim.relative_error:g})")
    return "; ".join(out) or None


_DECODED = re.compile(r"^(?P<layer>.+)\.(?:weight(?:_[A-Za-z0-9_]+)?|adapter_merge_dequantized)$")


def _onnx_layer_outputs(proto: onnx.ModelProto, layers: set[str]) -> dict[str, str]:
    """Layer name -> output name of the Conv/Gemm whose weight comes from that layer, in graph order."""
    out = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        m = _DECODED.match(node.input[1])
        if m and m.group("layer") in layers and m.group("layer") not in out:
            out[m.group("layer")] = node.output[0]
    return out


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
    names = _onnx_layer_outputs(proto, set(layers))
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


def failed_path(out: str | Path) -> Path:
    """Where a model that failed its parity check is kept: NAME.failed.onnx beside NAME.<ext>."""
    out = Path(out)
    return out.with_name(f"{out.stem}.failed.onnx")
