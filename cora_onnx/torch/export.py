"""Torch side of the export: BatchNorm fusion, the plan applied to a torch model (the
reference the ONNX file is checked against), and torch.onnx export to an onnx_ir model."""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from cora_onnx.core.errors import ModelError, PlanError
from cora_onnx.core.modelfile import onnx_bytes, save_onnx
from cora_onnx.core.npgrid import merged_grid
from cora_onnx.core.plan import Plan
from cora_onnx.core.progress import Progress
from cora_onnx.torch.quantizers import quantizable_layers

# quantizable_layers (cora_onnx.torch.quantizers) and onnx_bytes, save_onnx (cora_onnx.core.modelfile, no torch) are
# imported here for the callers of the exporter
__all__ = ["fuse_batchnorm", "remaining_batchnorm", "drop_unused_modules", "NotRun", "quantizable_layers", "apply_plan_torch", "AdaptedConv", "export_onnx",
           "export_program", "save_onnx", "onnx_bytes", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21  # INT4/UINT4 QuantizeLinear/DequantizeLinear


def fuse_batchnorm(model: nn.Module, input_size: int = 224) -> nn.Module:
    """A copy of model (eval mode) with every Conv+BatchNorm (and Linear+BatchNorm1d) pair fused
    (torch's fuse_conv_bn_eval): the Conv keeps its module name and gets the fused weight and bias,
    the BatchNorm becomes nn.Identity.

    Pairs come from the torch.export program of the model on a 2x3xSxS input (S = input_size):
    a conv/linear node whose only user is an inference batch_norm node, each module called once.
    torch.export runs the Python forward, so shape-dependent control flow (e.g. TensorFlow 'same'
    padding computed from the input size) is no obstacle, unlike torch.fx symbolic tracing, which
    is the fallback when torch.export fails. A model neither can trace is returned unfused (a
    copy), with a warning; export_program then keeps its BatchNorm nodes (see there).

    Modules that do not run in eval mode (auxiliary heads of inception_v3 and googlenet) are
    dropped first (drop_unused_modules): the exported graph has no trace of them, so they are
    neither searched nor planned.
    """
    model = copy.deepcopy(model).eval()
    drop_unused_modules(model, input_size)
    try:
        pairs = _batchnorm_pairs(model, input_size)
    except Exception as exc:  # torch.export raises many types on unexportable code
        log.info("torch.export cannot trace the model (%s); fusing BatchNorm with torch.fx",
                 str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
        return _fuse_batchnorm_fx(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fuse = torch.nn.utils.fusion.fuse_linear_bn_eval if isinstance(conv, nn.Linear) else \
            torch.nn.utils.fusion.fuse_conv_bn_eval
        _set_submodule(model, conv_name, fuse(conv, bn))
        _set_submodule(model, bn_name, nn.Identity())
    log.debug("BatchNorm fused into %d Conv/Linear layers", len(pairs))
    left = remaining_batchnorm(model)
    if left:
        log.info("%d BatchNorm layers are not after a Conv and stay in the graph (e.g. %s)", len(left), left[0])
    return model


class NotRun(nn.Module):
    """Stands in for a module that does not run in eval mode (drop_unused_modules); calling it is
    an error that names it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise ModelError(f"module {self.name} was dropped because it did not run in eval mode at the export "
                         f"input size, but it runs now")

    def extra_repr(self) -> str:
        return self.name


def drop_unused_modules(model: nn.Module, input_size: int) -> list[str]:
    """Replace, in place, each module with parameters or buffers that a forward of `model` (eval
    mode, one 3 x input_size x input_size zero image) never calls by NotRun, and return their
    names (the largest such modules: `AuxLogits`, not its layers). A model that does not run at
    that size is left as it is. Containers that are never called themselves (nn.ModuleList) are
    kept when any module inside them runs."""
    called: set[str] = set()
    names = {id(m): n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.add(names[id(mod)]))
             for m in model.modules()]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:  # any model error: nothing is dropped, the export will say what fails
        log.debug("drop_unused_modules: the model does not run at %d px (%s)", input_size, type(exc).__name__)
        return []
    finally:
        for h in hooks:
            h.remove()
    prefixes = {n.rpartition(".")[0] for n in called}  # every ancestor of a called module
    for n in list(prefixes):
        while n:
            n = n.rpartition(".")[0]
            prefixes.add(n)
    dropped: list[str] = []
    for name, mod in model.named_modules():
        if not name or name in called or name in prefixes or any(name.startswith(d + ".") for d in dropped):
            continue
        if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
            dropped.append(name)
    originals = {name: model.get_submodule(name) for name in dropped}
    for name in dropped:
        _set_submodule(model, name, NotRun(name))
    try:  # a module whose parameters the forward uses without calling it must stay
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.zeros(1, 3, input_size, input_size))
    except Exception:
        for name, mod in originals.items():
            _set_submodule(model, name, mod)
        log.debug("drop_unused_modules: the forward uses modules it does not call; nothing dropped")
        return []
    if dropped:
        log.info("%d modules do not run in eval mode and are left out (not quantized, not exported): %s",
                 len(dropped), ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    return dropped


def remaining_batchnorm(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules of model (none after a successful fuse_batchnorm, except
    those that follow no Conv/Linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


_CONV_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default")
_BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


def _batchnorm_pairs(model: nn.Module, input_size: int) -> list[tuple[str, str]]:
    """(conv module, batchnorm module) name pairs found in the torch.export program of model."""
    x = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,), strict=False)
    sig = ep.graph_signature
    owner = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # placeholder -> parameter/buffer name

    def module_of(arg, suffix: str) -> str | None:
        name = owner.get(getattr(arg, "name", None), "")
        return name[: -len(suffix)] if name.endswith(suffix) else None

    calls: dict[str, int] = {}  # module name -> number of graph nodes using its parameters
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in owner:
            mod = owner[node.name].rpartition(".")[0]
            calls[mod] = max(calls.get(mod, 0), len(node.users))
    pairs = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _CONV_OPS or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        if str(bn_node.target) not in _BN_OPS or bn_node.args[0] is not node:
            continue
        if str(bn_node.target) == "aten.batch_norm.default" and bn_node.args[5]:  # training
            continue
        conv_name, bn_name = module_of(node.args[1], ".weight"), module_of(bn_node.args[3], ".running_mean")
        if conv_name is None or bn_name is None or calls.get(conv_name) != 1 or calls.get(bn_name) != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if isinstance(conv, nn.Linear):
            val = node.meta.get("val")
            if not isinstance(bn, nn.BatchNorm1d) or val is None or val.dim() != 2:
                continue
        elif not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
            continue
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _fuse_batchnorm_fx(model: nn.Module) -> nn.Module:
    import torch.fx.experimental.optimization as fx_opt

    try:
        fused = fx_opt.fuse(model)
    except Exception as exc:  # fx raises many types on untraceable code
        log.warning("BatchNorm not fused: neither torch.export nor torch.fx can trace the model (%s); "
                    "it stays as BatchNormalization nodes in the ONNX graph", str(exc).splitlines()[0][:160])
        return model
    left = remaining_batchnorm(fused)
    if left:
        log.info("%d BatchNorm layers are not after a Conv and stay in the graph (e.g. %s)", len(left), left[0])
    return fused.eval()


def apply_plan_torch(model: nn.Module, plan: Plan, merge_bits: int | None = None) -> nn.Module:
    """A copy of model whose planned weights are replaced by their dequantized values (and,
    when a layer has an adapter, wrapped with the low-rank branch; with merge_bits, the adapter
    is merged into the weight on a merge_bits grid instead, as passes.AdapterMergePass exports it;
    with merge_bits, weights with group-wise scales are re-quantized per channel to merge_bits
    the same way, as integer kernels need)."""
    model = copy.deepcopy(model).eval()
    layers = quantizable_layers(model)
    for lp in plan.layers:
        module = layers.get(lp.name)
        if module is None:
            raise PlanError(f"plan layer {lp.name} is not a Conv2d/Linear of the model")
        if tuple(module.weight.shape) != lp.shape:
            raise PlanError(f"plan layer {lp.name}: shape {lp.shape} differs from the model's {tuple(module.weight.shape)}")
        with torch.no_grad():
            if lp.uniform is not None:
                module.weight.copy_(torch.from_numpy(lp.uniform.dequantize()))
            if lp.bias is not None:
                module.bias = nn.Parameter(torch.from_numpy(lp.bias.values.copy()))
        if merge_bits is not None and (lp.adapter is not None or (lp.uniform is not None and lp.uniform.group)):
            q, scale = merged_grid(lp, merge_bits)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(q.astype(np.float32) * scale.reshape((-1,) + (1,) * (q.ndim - 1))))
        elif lp.adapter is not None:
            parent, _, leaf = lp.name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, AdaptedConv(module, lp.adapter))
        if lp.codebook is not None:
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(lp.codebook.decode(lp.shape)))
                if lp.codebook.bias is not None:
                    bias = torch.from_numpy(lp.codebook.bias).float()
                    if module.bias is None:
                        module.bias = nn.Parameter(bias)
                    else:
                        module.bias.copy_(bias)
    return model


class AdaptedConv(nn.Module):
    """conv(x) + B(A(x)): the low-rank branch as two convolutions, exactly as exported to ONNX."""

    def __init__(self, conv: nn.Conv2d, adapter) -> None:
        super().__init__()
        self.conv = conv
        self.adapter_a = nn.Conv2d(conv.in_channels, adapter.rank, conv.kernel_size, stride=conv.stride,
                                   padding=conv.padding, dilation=conv.dilation, bias=False)
        self.adapter_b = nn.Conv2d(adapter.rank, conv.out_channels, 1, bias=False)
        with torch.no_grad():
            self.adapter_a.weight.copy_(torch.from_numpy(adapter.a))
            self.adapter_b.weight.copy_(torch.from_numpy(adapter.b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.adapter_b(self.adapter_a(x))


def export_onnx(model: nn.Module, input_size: int, opset: int = DEFAULT_OPSET) -> ir.Model:
    """torch.onnx (dynamo) export with a dynamic batch; input named "input", output "logits"."""
    return export_program(model, input_size, opset).model


def export_program(model: nn.Module, input_size: int, opset: int = DEFAULT_OPSET):
    """The torch.onnx ONNXProgram: .model is the onnx_ir model of export_onnx; .exported_program
    is the torch.export program whose node names are the ONNX value names (used to simulate
    activation quantization in PyTorch at the same tensors)."""
    x = torch.zeros(2, 3, input_size, input_size)
    # The exporter's optimizer fuses Conv+BatchNorm into the Conv's weight. A plan is made from the
    # weights of the PyTorch model, so a BatchNorm left there (fuse_batchnorm could not trace the
    # model) must stay a BatchNormalization node: export unoptimized, then fold constants only.
    keep_bn = bool(remaining_batchnorm(model))
    if keep_bn:
        log.warning("the model still has BatchNorm layers: exported as BatchNormalization nodes "
                    "(the exporter's graph optimizer, which would fuse them into the planned weights, is off)")
    with warnings.catch_warnings(), torch.no_grad(), Progress("torch.onnx export", quiet_end=True):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model.eval(), (x,), dynamo=True, opset_version=opset, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=not keep_bn)
            if keep_bn:
                import onnxscript.optimizer

                onnxscript.optimizer.fold_constants(program.model)
                onnxscript.optimizer.remove_unused_nodes(program.model)
        except Exception as exc:
            raise ModelError(f"torch.onnx export failed: {str(exc).splitlines()[0][:300]}") from None
    model_ir = program.model
    graph = model_ir.graph
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ModelError(f"expected a model with one input and one output, got {len(graph.inputs)}/{len(graph.outputs)}")
    graph.inputs[0].name = "input"
    graph.outputs[0].name = "logits"
    model_ir.producer_name = "cora-onnx"
    return program
