"""PyTorch simulation of integer activations: the exported program of the (weight-quantized)
model, run node by node with fake quantization at exactly the tensors that carry activation
QDQ in the ONNX graph (torch.onnx names ONNX values after the exported program's nodes), with
the same scales and zero points. It is the reference ONNX Runtime's integer kernels are checked
against: tensor by tensor, each computed from ONNX Runtime's own values of the tensors before it,
they agree to one quantization step (cora_onnx.torch.verify.tensor_check)."""

from __future__ import annotations

import copy
import operator
from typing import Collection, Mapping

import numpy as np
import torch
from torch import nn

from cora_onnx.core.errors import ModelError

__all__ = ["ActivationQuantSim"]

_SILU = (torch.ops.aten.silu.default, torch.ops.aten.silu_.default)


class ActivationQuantSim(nn.Module):
    """program: cora_onnx.torch.export.export_program(BN-fused model) (any weights); weights: the module
    whose state_dict holds the (fake-quantized) weights to use; qparams: ONNX tensor name ->
    (scale, zero point) from passes.activation_qparams; act_range: (qmin, qmax); input_name: the
    ONNX graph input (its tensor is the first user input of the program); biases: layer -> the bias
    ONNX Runtime's integer kernel adds (its INT32 grid dequantized,
    cora_onnx.onnx.verify.integer_biases), used instead of the float bias of that layer so the
    simulation rounds where ONNX Runtime does, not a fraction of a step away. shared: the tensors
    of qparams that reuse another tensor's parameters through a data-movement op (the layout's
    `shared`): one an ONNX pass made (e.g. the Reshape that replaced a Flatten, under a new name)
    may be absent from the program, since quantizing moved data again with the same parameters
    changes nothing; every other tensor must be a node of the program. gates: program node (an
    x * sigmoid(x), one silu node) -> the ONNX tensor of its sigmoid factor, when the exporter
    wrote it as Sigmoid -> Mul (cora_onnx.onnx.verify.gated_sigmoids): a quantized factor is
    rounded inside that node, as ONNX Runtime's QLinearSigmoid -> QLinearMul does."""

    def __init__(self, program, weights: nn.Module, qparams: Mapping[str, tuple[float, int]],
                 act_range: tuple[int, int], input_name: str = "input",
                 biases: Mapping[str, np.ndarray] | None = None, shared: Collection[str] = (),
                 gates: Mapping[str, str] | None = None) -> None:
        super().__init__()
        # a copy: the program's parameters share storage with the ONNX model's initializers (torch.onnx
        # wraps them without copying), and loading the quantized weights in place would overwrite the
        # float weights of the exported graph (caught by the plan's weight fingerprints)
        gm = copy.deepcopy(program.exported_program.module())
        missing, _ = gm.load_state_dict(weights.state_dict(), strict=False)
        params = {n for n, _ in gm.named_parameters()}
        if params & set(missing):
            raise ModelError(f"simulation: the weights do not fit the exported program ({sorted(params & set(missing))[0]})")
        state = gm.state_dict()
        ints = {f"{layer}.bias": torch.as_tensor(np.asarray(b, np.float32)) for layer, b in (biases or {}).items()
                if f"{layer}.bias" in state and state[f"{layer}.bias"].shape == tuple(np.shape(b))}
        gm.load_state_dict(ints, strict=False)
        self.gm = gm  # (exported modules refuse .eval(); they are inference graphs already)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        alias = {placeholders[0]: input_name} if placeholders else {}
        # a multi-output op (aten.split: torch.chunk in ShuffleNet's channel split) is one FX node read
        # through getitem nodes; torch.onnx names its outputs <node>_split_<i>
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int) \
                    and f"{n.args[0].name}_split_{n.args[1]}" in qparams:
                alias[n.name] = f"{n.args[0].name}_split_{n.args[1]}"
        names = {n.name for n in gm.graph.nodes}
        silu = {n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _SILU}
        self.gates = {node: t for node, t in (gates or {}).items() if node in silu and t in qparams}
        inner = set(self.gates.values())
        unknown = [t for t in qparams if t not in names and t not in alias.values() and t not in set(shared)
                   and t not in inner]
        if unknown:
            raise ModelError(f"simulation: tensor {unknown[0]} of the ONNX graph is not a node of the exported program")
        self.alias = alias
        self.qparams = dict(qparams)
        self.act_range = act_range
        self.capture: dict | None = None  # set to a dict to collect Conv/Linear outputs by layer name

    def train(self, mode: bool = True) -> "ActivationQuantSim":
        return self  # always an inference graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def run(self, x: torch.Tensor, force: Mapping[str, np.ndarray] | None = None) -> tuple[torch.Tensor, dict]:
        """(output, integers): the simulation's output on x and, with `force`, its integer values at
        every quantized tensor (ONNX tensor name -> int32 array, before `force` applies; {} without
        force). force: tensor name -> integers (ONNX Runtime's) that replace the simulation's own at
        that tensor, so each quantized tensor is computed from ONNX Runtime's values of the tensors
        before it."""
        sim = self
        integers: dict[str, np.ndarray] = {}
        record, force = force is not None, force or {}
        qmin, qmax = self.act_range

        def rounded(name: str, out: torch.Tensor) -> torch.Tensor:
            qp = sim.qparams[name]
            q = torch.clamp(torch.round(out / qp[0]) + qp[1], qmin, qmax)
            if record:
                integers[name] = q.detach().to(torch.int32).numpy()
            if name in force:
                q = torch.as_tensor(np.asarray(force[name]), dtype=out.dtype).reshape(q.shape)
            return (q - qp[1]) * qp[0]

        class _Run(torch.fx.Interpreter):
            def run_node(self, n):
                if n.name in sim.gates:  # x * sigmoid(x), its factor rounded where ONNX Runtime rounds it
                    x = self.fetch_args_kwargs_from_env(n)[0][0]
                    out = x * rounded(sim.gates[n.name], torch.sigmoid(x))
                else:
                    out = super().run_node(n)
                if sim.capture is not None and n.op == "call_function" and len(n.args) > 1 \
                        and getattr(n.args[1], "op", None) == "get_attr" and str(n.args[1].target).endswith(".weight"):
                    sim.capture[str(n.args[1].target)[: -len(".weight")]] = out.detach().clone()  # before rounding
                name = sim.alias.get(n.name, n.name)
                qp = sim.qparams.get(name)
                if qp is not None and isinstance(out, torch.Tensor):
                    out = rounded(name, out)
                return out

        with torch.inference_mode():
            out = _Run(self.gm.graph.owning_module).run(x)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out, integers
