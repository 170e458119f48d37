"""Distillation fine-tuning of the codewords (and channel scales and biases) from the float network."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cora_onnx.core.progress import progress
from cora_onnx.torch.search.distill import augment_batch, distill_loss  # shared with CoRa's distillation
from cora_onnx.torch.search.pq.codebook import _round_scaled
from cora_onnx.torch.search.pq.settings import PqSettings

__all__ = ["finetune", "codebook_weight"]

log = logging.getLogger(__name__)


def codebook_weight(cw: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, shape) -> torch.Tensor:
    w = cw[codes]
    if scale is not None:
        w = w * scale[:, None, None]
    return w.reshape(shape)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the softmax of a batch of logits."""
    with torch.no_grad():
        logp = F.log_softmax(logits.float(), 1)
        return -(logp.exp() * logp).sum(1).mean()


def finetune(teacher: nn.Module, student: nn.Module, slayers: dict[str, nn.Module], state: dict[str, dict], images,
             settings: PqSettings, gen: torch.Generator) -> dict:
    """Distillation from the float network (loss `settings.distill`, inputs augmented by
    `settings.augment`) of the codewords, and of the channel scales and biases unless switched off."""
    from torch.func import functional_call

    params, shapes = {}, {}
    frozen = set() if settings.finetune_last else {list(state)[-1]}
    for name, st in state.items():
        if name in frozen:
            continue
        cw = st["codewords"].clone().requires_grad_(True)
        k = cw.shape[0]
        counts = torch.bincount(st["codes"].reshape(-1), minlength=k).float().clamp_min(1.0)
        cw.register_hook(lambda g, c=counts: g / c[:, None])  # mean, not sum, of the assigned sub-vectors' grads
        st["codewords"] = cw
        if st["scale"] is not None and settings.finetune_scales:
            st["scale"] = st["scale"].clone().requires_grad_(True)
        if settings.finetune_biases:
            st["bias"] = st["bias"].clone().requires_grad_(True)
        shapes[name] = tuple(slayers[name].weight.shape)
        params[name] = [p for p in (cw, st["scale"], st["bias"]) if p is not None and p.requires_grad]
    if not params:
        return {}
    opt = torch.optim.Adam([p for ps in params.values() for p in ps], lr=settings.finetune_lr)
    fixed_inputs = settings.augment == "none"
    with torch.no_grad():  # without augmentation the teacher's logits are computed once
        teacher_logits = torch.cat([teacher(x.contiguous(memory_format=torch.channels_last))
                                    for x in images.batches(settings.search_batch)]) if fixed_inputs else None
    n = len(images)
    student.eval()
    losses, entropies = [], []
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in progress(range(settings.finetune_steps), settings.finetune_steps, "pq: fine-tuning codewords", "steps"):
        if pos + settings.search_batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + settings.search_batch]
        pos += settings.search_batch
        # channels-last input: PyTorch's CPU convolutions (depthwise above all) run ~1.5x faster fwd+bwd
        x = augment_batch(images.preprocess.normalize(images.images[idx]), settings.augment, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        if fixed_inputs:
            target = teacher_logits[idx]
        else:
            with torch.no_grad():
                target = teacher(x)
        overrides = {}
        for name in params:  # frozen layers keep the weights and biases already in the student
            st = state[name]
            overrides[f"{name}.weight"] = codebook_weight(st["codewords"], st["codes"], st["scale"], shapes[name])
            overrides[f"{name}.bias"] = st["bias"]
        logits = functional_call(student, overrides, (x,))
        loss = distill_loss(logits, target, settings.distill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if settings.distill == "kl":  # the batch's floor: the loss minus it is the batch's KL to the teacher
            entropies.append(float(_entropy(target)))
    for st in (state[name] for name in params):
        for key in ("codewords", "scale", "bias"):
            if st[key] is not None:
                st[key] = st[key].detach()
        if st["scale"] is not None:
            st["codewords"], st["scale"] = _round_scaled(st["codewords"], st["scale"])
        else:
            st["codewords"] = st["codewords"].half().float()
    head = float(np.mean(losses[: max(1, len(losses) // 10)]))
    tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
    out = {"steps": len(losses), "loss": settings.distill, "augment": settings.augment, "loss_first": head,
           "loss_last": tail, "seconds": time.perf_counter() - t0}
    if settings.distill == "kl" and entropies:
        # the soft cross-entropy's floor is the teacher's entropy on the same batch: loss - entropy is the
        # KL to the teacher (the entropy of all images against a few batches' loss can go below zero)
        kl = np.asarray(losses) - np.asarray(entropies)
        k = max(1, len(kl) // 10)
        out["teacher_entropy"] = float(np.mean(entropies))
        out["kl_first"], out["kl_last"] = float(kl[:k].mean()), float(kl[-k:].mean())
        log.info("fine-tuning: %d steps, distillation loss %.4f -> %.4f (teacher entropy %.4f: KL %.4f -> %.4f) "
                 "(%.1f s)", len(losses), head, tail, out["teacher_entropy"], out["kl_first"], out["kl_last"],
                 out["seconds"])
    else:
        log.info("fine-tuning: %d steps, %s loss (augment %s) %.4f -> %.4f (%.1f s)", len(losses),
                 settings.distill, settings.augment, head, tail, out["seconds"])
    return out
