"""Import product-quantized checkpoints in the format published with "And the bit goes down"
(Stock et al., ICLR 2020) and export them to ONNX exactly, verified in ONNX Runtime.

The checkpoint maps each module name of a torchvision ResNet to a dict:
- Conv/Linear, product-quantized: ``centroids`` (k x d, float16), ``assignments`` (uint8, or int16
  with more than 256 codewords), ``n_blocks`` (sub-vectors per output channel), ``k`` (kernel size),
  ``is_conv``. The weight is
  ``centroids[assignments].reshape(n_blocks, C_out, d).permute(1, 0, 2).reshape(weight_shape)``:
  each output channel's C_in*k*k values cut into n_blocks sub-vectors of d, ``assignments`` listing
  sub-vector 0 of every output channel, then sub-vector 1, ... (block-major).
- Conv/Linear, plain: ``weight`` (e.g. the stem conv).
- BatchNorm: ``weight`` and ``bias`` only; inference runs them with mean 0 and variance 1.
- ``<linear name>_bias``: ``{"bias": tensor}`` for a Linear layer's bias (``fc_bias``).

The decoded PyTorch model (the reference) is the architecture with these weights and BatchNorm
statistics 0/1. The ONNX file keeps the codes (transposed to the output-channel-major layout of
`Codebook`, a permutation: no byte more) and codewords, decodes each weight with the Gather subgraph of
`passes.CodebookDecodePass`, multiplies it by the fused BatchNorm scale gamma/sqrt(1 + eps) (a
float32 per-channel constant; ONNX Runtime folds the whole subgraph at load) and uses the
BatchNorm shift (float16, as stored) as the bias.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cora_onnx.core.options import RunOptions
from cora_onnx.onnx.data import load_class_map, load_images
from cora_onnx.core.errors import ConstantOutputError, InputError, ModelError, ParityError, SettingsError
from cora_onnx.torch.export import export_program, fuse_batchnorm
from cora_onnx.core.files import atomic_write, check_input_file, check_output_path
from cora_onnx.core.modelfile import onnx_bytes
from cora_onnx.onnx.pipeline import apply_plan
from cora_onnx.core.plan import Codebook, LayerPlan, Plan
from cora_onnx.core.records import to_json
from cora_onnx.onnx.report import ImportReport, Outcome, environment, write_report
from cora_onnx.onnx.verify import cpu_threads, failed_path, measure_latency, session, size_breakdown, top1
from cora_onnx.torch.verify import check_file

__all__ = ["ARCHITECTURES", "ImportResult", "import_pq", "read_pq_checkpoint", "decode_pq_checkpoint",
]

log = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
PQ_KEYS = frozenset({"centroids", "assignments", "n_blocks", "k", "is_conv"})
BN_KEYS = frozenset({"weight", "bias"})
# max |logit difference| between ONNX Runtime and the decoded PyTorch model, relative to the largest
# |logit| of the reference (float32 summation order differs: BatchNorm fused, other conv kernels)


@dataclass(frozen=True, eq=False)
class ImportResult:
    report: ImportReport
    plan: Plan
    onnx_path: Path
    decoded_model: nn.Module


def read_pq_checkpoint(path: str | Path) -> dict[str, dict[str, Any]]:
    """The checkpoint's entries (module name -> dict). InputError when the file is not a readable
    PyTorch file, ModelError when it is not a checkpoint of this format."""
    p = check_input_file(path, "checkpoint")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"checkpoint {p} is not a readable PyTorch file ({_load_reason(exc)})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, dict) for k, v in obj.items()):
        raise ModelError(f"checkpoint {p} is not a product-quantized checkpoint (expected a mapping of module "
                         f"names to dicts with centroids/assignments, weight or weight/bias)")
    return obj


def _load_reason(exc: Exception) -> str:
    """The cause torch.load gives, without its advice on weights_only (a checkpoint of this format
    holds only tensors and plain values, so it never needs weights_only=False)."""
    text = str(exc)
    _, sep, tail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (tail if sep else text).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return ("unpickling refused: " if sep else "") + reason[:200]


def _module_entries(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with parameters the checkpoint must describe, by name; others are refused."""
    out = {}
    for name, m in model.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            raise ModelError(f"module {name} ({type(m).__name__}) is not a Conv2d, Linear or BatchNorm2d: "
                             f"the checkpoint format does not describe it")
        out[name] = m
    return out


def _conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Conv name -> name of the BatchNorm applied directly (and only) to its output (torch.fx)."""
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on untraceable code
        raise ModelError(f"torch.fx cannot trace the model: {str(exc).splitlines()[0][:160]}") from None
    mods = dict(gm.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(mods.get(src.target), nn.Conv2d) and len(src.users) == 1):
                pairs[str(src.target)] = str(node.target)
    return pairs


def _tensor(entry: dict, key: str, where: str) -> torch.Tensor:
    t = entry.get(key)
    if not isinstance(t, torch.Tensor):
        raise ModelError(f"{where}: {key!r} must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ModelError(f"{where}: {key!r} has NaN or infinite values")
    return t


def _int(entry: dict, key: str, where: str) -> int:
    v = entry.get(key)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ModelError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    return v


def _codebook(name: str, entry: dict, module: nn.Module, where: str) -> Codebook:
    """The layer's codes and codewords in the Codebook layout, with every fact checked against the module."""
    extra = sorted(set(entry) - PQ_KEYS)
    if extra:
        raise ModelError(f"{where}: unexpected key {extra[0]!r} in a product-quantized entry")
    centroids = _tensor(entry, "centroids", where)
    assignments = _tensor(entry, "assignments", where)
    n_blocks, ksize = _int(entry, "n_blocks", where), _int(entry, "k", where)
    is_conv = entry.get("is_conv")
    conv = isinstance(module, nn.Conv2d)
    if not isinstance(is_conv, bool) or is_conv != conv:
        raise ModelError(f"{where}: is_conv is {is_conv!r} but {name} is a {type(module).__name__}")
    if conv and tuple(module.kernel_size) != (ksize, ksize):
        raise ModelError(f"{where}: kernel size k={ksize} but {name} has kernel {tuple(module.kernel_size)}")
    if centroids.dtype != torch.float16 or centroids.dim() != 2 or centroids.shape[0] < 1:
        raise ModelError(f"{where}: centroids must be a float16 k x d matrix, got {centroids.dtype} "
                         f"{tuple(centroids.shape)}")
    k, d = centroids.shape
    if k > 65536:
        raise ModelError(f"{where}: {k} codewords, at most 65536 are supported")
    if assignments.is_floating_point() or assignments.dtype == torch.bool or assignments.dim() != 1:
        raise ModelError(f"{where}: assignments must be a 1-D integer tensor, got {assignments.dtype} "
                         f"{tuple(assignments.shape)}")
    shape = tuple(module.weight.shape)
    c_out, per_filter = shape[0], int(np.prod(shape[1:]))
    if n_blocks * d != per_filter or assignments.numel() != n_blocks * c_out:
        raise ModelError(f"{where}: block layout does not fit weight {shape}: n_blocks {n_blocks} x d {d} = "
                         f"{n_blocks * d} values per output channel (the layer has {per_filter}), "
                         f"{assignments.numel()} assignments (expected {n_blocks} x {c_out} = {n_blocks * c_out})")
    a = assignments.to(torch.int64)
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= k):
        raise ModelError(f"{where}: assignments range {int(a.min())}..{int(a.max())} outside the {k} codewords")
    codes = a.reshape(n_blocks, c_out).t().contiguous().numpy().astype(np.uint8 if k <= 256 else np.uint16)
    return Codebook(block_size=int(d), codewords=centroids.numpy().copy(), codes=codes)


def decode_pq_checkpoint(entries: dict[str, dict[str, Any]], model: nn.Module, source: str = "checkpoint",
                         arch: str | None = None) -> tuple[nn.Module, Plan]:
    """(decoded model, plan): a copy of `model` (eval) holding the decoded weights, BatchNorm with
    running mean 0 and variance 1; and a Plan with one Codebook per product-quantized layer whose
    decode (times its scale, plus its bias) is that layer's weight after BatchNorm fusion.
    ModelError when the checkpoint does not fit the architecture (named `arch` in messages)."""
    model = copy.deepcopy(model).eval()
    modules = _module_entries(model)
    bias_keys = {f"{n}_bias": n for n, m in modules.items() if isinstance(m, nn.Linear) and m.bias is not None}
    missing = [n for n in list(modules) + list(bias_keys) if n not in entries]
    unexpected = [n for n in entries if n not in modules and n not in bias_keys]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} modules missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected entries (e.g. {unexpected[0]})")
        raise ModelError(f"{source} does not fit {arch or type(model).__name__}: {'; '.join(parts)}")
    codebooks: dict[str, Codebook] = {}
    with torch.no_grad():
        for name, m in modules.items():
            entry, where = entries[name], f"{source} entry {name}"
            if isinstance(m, nn.BatchNorm2d):
                if set(entry) != BN_KEYS:
                    raise ModelError(f"{where}: a BatchNorm entry holds exactly weight and bias, got {sorted(entry)}")
                for key in ("weight", "bias"):
                    t = _tensor(entry, key, where)
                    if tuple(t.shape) != (m.num_features,):
                        raise ModelError(f"{where}: {key} has shape {tuple(t.shape)}, {name} needs ({m.num_features},)")
                    getattr(m, key).copy_(t.float())
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                continue
            if PQ_KEYS & set(entry):
                cb = _codebook(name, entry, m, where)
                codebooks[name] = cb
                m.weight.copy_(torch.from_numpy(cb.decode(tuple(m.weight.shape))))
            else:
                if set(entry) != {"weight"}:
                    raise ModelError(f"{where}: expected centroids/assignments/n_blocks/k/is_conv or a plain "
                                     f"weight, got keys {sorted(entry)}")
                w = _tensor(entry, "weight", where)
                if tuple(w.shape) != tuple(m.weight.shape):
                    raise ModelError(f"{where}: weight shape {tuple(w.shape)}, {name} needs {tuple(m.weight.shape)}")
                m.weight.copy_(w.float())
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                raise ModelError(f"{name}: convolutions with a bias are not in the checkpoint format")
        for key, name in bias_keys.items():
            entry, m = entries[key], modules[name]
            if set(entry) != {"bias"}:
                raise ModelError(f"{source} entry {key}: expected exactly 'bias', got {sorted(entry)}")
            b = _tensor(entry, "bias", f"{source} entry {key}")
            if tuple(b.shape) != tuple(m.bias.shape):
                raise ModelError(f"{source} entry {key}: bias shape {tuple(b.shape)}, {name} needs {tuple(m.bias.shape)}")
            m.bias.copy_(b.float())
    pairs = _conv_bn_pairs(model)
    layers = []
    for name, cb in codebooks.items():
        m = modules[name]
        bn_name = pairs.get(name)
        if bn_name is not None:
            bn = modules[bn_name]
            # exactly the factor torch.nn.utils.fuse_conv_bn_weights multiplies the weight by (float32)
            scale = (bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)).numpy().astype(np.float32)
            cb = Codebook(cb.block_size, cb.codewords, cb.codes, scale=scale,
                          bias=entries[bn_name]["bias"].numpy().astype(np.float16))
        elif isinstance(m, nn.Conv2d):
            raise ModelError(f"{name}: a product-quantized conv without a BatchNorm after it is not supported")
        layers.append(LayerPlan(name=name, kind="conv" if isinstance(m, nn.Conv2d) else "linear",
                                shape=tuple(m.weight.shape), codebook=cb,
                                info={"block_size": cb.block_size, "codewords": int(cb.codewords.shape[0]),
                                      "batchnorm": bn_name}))
    plan = Plan("pq-import", {"source": source}, tuple(layers))
    return model, plan


def _build(arch: str, entries: dict) -> nn.Module:
    import torchvision

    if arch not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture {arch!r} for import-pq; expected one of {', '.join(ARCHITECTURES)}")
    fc = entries.get("fc")
    classes = None
    if isinstance(fc, dict) and isinstance(fc.get("n_blocks"), int) and isinstance(fc.get("assignments"), torch.Tensor) \
            and fc["n_blocks"] > 0 and fc["assignments"].numel() % fc["n_blocks"] == 0:
        classes = fc["assignments"].numel() // fc["n_blocks"]
    elif isinstance(fc, dict) and isinstance(fc.get("weight"), torch.Tensor) and fc["weight"].dim() == 2:
        classes = int(fc["weight"].shape[0])
    return torchvision.models.get_model(arch, weights=None, **({"num_classes": classes} if classes else {}))


def _check_fused(fused: nn.Module, plan: Plan) -> None:
    """The BN-fused weights (which the exported initializers hold) are what the plan decodes to."""
    mods = dict(fused.named_modules())
    for lp in plan.layers:
        w = mods[lp.name].weight.detach().numpy()
        want = lp.codebook.decode(lp.shape)
        if not np.allclose(w, want, rtol=1e-6, atol=0):
            raise ModelError(f"layer {lp.name}: the BatchNorm-fused weight differs from its codebook decoding "
                             f"(max {float(np.abs(w - want).max()):.3g}); BatchNorm was not fused as expected")


def import_pq(checkpoint: str | Path, model: str | nn.Module = "resnet18", out: str | Path | None = None,
              options: RunOptions | None = None, **keywords) -> ImportResult:
    """Turn a product-quantized checkpoint (format above) into an ONNX file and verify it. The run
    options (`options`, or keywords that build them: RunOptions.of) used: out (default model.onnx),
    val, calib, class_map, input_size (224), crop_ratio, mean, std, report, batch_size,
    parity_images, latency_runs, threads, seed.

    model: "resnet18", "resnet34", "resnet50" (torchvision; the class count is read from the
    classifier entry) or an nn.Module of the architecture the checkpoint was made for. val:
    labelled folder (top-1 of ONNX Runtime and of the decoded PyTorch model, parity on all of
    it); calib: images for parity when val is not given (at most parity_images of them).
    ParityError when ONNX Runtime disagrees with the decoded PyTorch model beyond the weight-only
    limits of cora_onnx.onnx.verify.PARITY_LIMITS, ConstantOutputError when its outputs do not
    depend on the input (the model is then kept as NAME.failed.onnx, the report says verified false); latency_runs 0 skips the timing. Returns the report (also written to
    `report` as JSON), the plan, and the decoded PyTorch model."""
    opts = RunOptions.resolve(options, **keywords, **({"out": out} if out is not None else {}))
    out = opts.out if opts.out is not None else Path("model.onnx")
    check_output_path(out, "output model")
    report, batch_size, latency_runs, seed = opts.report, opts.batch_size, opts.latency_runs, opts.seed
    if not opts.val and not opts.calib:
        raise SettingsError("give val or calib images: parity with the decoded PyTorch model is measured on them")
    pre = opts.preprocess
    threads = opts.threads or cpu_threads()
    ckpt = Path(checkpoint)
    entries = read_pq_checkpoint(ckpt)
    arch = model if isinstance(model, str) else type(model).__name__
    base = _build(model, entries) if isinstance(model, str) else model
    decoded, plan = decode_pq_checkpoint(entries, base, source=f"checkpoint {ckpt.name}", arch=arch)
    plan = Plan(plan.method, plan.settings, plan.layers,
                meta={"model": arch, "input_size": pre.input_size, "crop_ratio": pre.crop_ratio,
                      "mean": list(pre.mean), "std": list(pre.std)})
    log.info("%s: %d product-quantized layers decoded", ckpt.name, len(plan.layers))
    n_classes = decoded.fc.out_features if isinstance(getattr(decoded, "fc", None), nn.Linear) else None
    cmap = load_class_map(opts.class_map) if opts.class_map is not None else None
    val_set = load_images(opts.val, pre, labelled=True, class_map=cmap, num_classes=n_classes,
                          what="validation folder") if opts.val else None
    parity_set = val_set if val_set is not None else \
        load_images(opts.calib, pre, what="calibration folder").subset(opts.parity_images, seed)

    t0 = time.perf_counter()
    fused = fuse_batchnorm(decoded)
    _check_fused(fused, plan)
    model_ir = export_program(fused, pre.input_size).model
    model_ir.metadata_props["cora_onnx.preprocess"] = json.dumps(plan.meta_preprocess())
    model_ir.metadata_props["cora_onnx.source"] = f"product-quantized checkpoint {ckpt.name}"
    float_bytes = onnx_bytes(model_ir)
    data = onnx_bytes(apply_plan(model_ir, plan))
    export_seconds = time.perf_counter() - t0

    sess = session(data, threads=threads)
    check = check_file(data, decoded, parity_set, False, sess=sess, batch_size=batch_size, threads=threads)
    ort_logits, ref_logits = check.logits, check.reference
    par, failure, constant = check.verdict.parity, check.verdict.failure, check.verdict.constant_output
    t1 = None
    if val_set is not None:
        t1 = {"decoded_torch": top1(ref_logits, val_set.labels), "onnxruntime": top1(ort_logits, val_set.labels)}
    lat = {}
    if latency_runs > 0 and failure is None:
        log.info("measuring latency (%d interleaved runs)", latency_runs)
        lat = measure_latency({"float": float_bytes, "imported": sess}, (3, pre.input_size, pre.input_size),
                              runs=latency_runs, threads=threads, seed=seed)
    ckpt_bytes = ckpt.stat().st_size
    code_bytes = sum(lp.codebook.codes.nbytes for lp in plan.layers)
    book_bytes = sum(lp.codebook.codewords.nbytes for lp in plan.layers)
    rep = ImportReport(
        model=arch, checkpoint=str(ckpt), checkpoint_bytes=ckpt_bytes, onnx_path=str(out), onnx_bytes=len(data),
        onnx_to_checkpoint=len(data) / ckpt_bytes, float_onnx_bytes=len(float_bytes),
        compression_ratio=len(float_bytes) / len(data), top1=t1, parity=par, outcome=Outcome(verified=failure is None),
        latency_ms={k: lat[k]["batch_1"]["median_ms"] if k in lat else None for k in ("float", "imported")},
        latency=lat, size_breakdown={"float": size_breakdown(float_bytes), "imported": size_breakdown(data)},
        codebooks={"layers": len(plan.layers), "codes_bytes": code_bytes, "codewords_bytes": book_bytes,
                   "code_dtypes": sorted({lp.codebook.codes.dtype.name for lp in plan.layers})},
        export_seconds=export_seconds,
        layers=tuple(to_json({"name": lp.name, "shape": list(lp.shape), **dict(lp.info),
                              "codes": lp.codebook.codes.dtype.name}) for lp in plan.layers),
        preprocess=plan.meta_preprocess(),
        images={"parity": len(parity_set), "val": len(val_set) if val_set is not None else 0},
        environment=environment(threads))
    if failure is not None:
        failed = failed_path(out)
        atomic_write(failed, lambda f: f.write(data))
        what = "not verified" if constant else \
            f"ONNX Runtime does not reproduce the decoded PyTorch model on {par.images} images"
        msg = f"{what}: {failure}; {out} not written, the model is kept as {failed} for inspection"
        rep = dataclasses.replace(rep, onnx_path=str(failed), outcome=Outcome(
            verified=False, failure="constant_output" if constant else "parity", parity_error=msg))
        if report is not None:
            write_report(rep, report)
        raise (ConstantOutputError if constant else ParityError)(msg)
    atomic_write(out, lambda f: f.write(data))
    if report is not None:
        write_report(rep, report)
    return ImportResult(rep, plan, Path(out), decoded)
