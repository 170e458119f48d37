"""Distillation toward the float network, shared by the searches: losses on logits and layer
outputs, forward hooks that capture layer outputs, and the augmentation of a calibration batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DISTILLS", "distill_loss", "kd_loss", "logit_mse", "feature_loss", "Capture", "AUGMENTS", "augment_batch"]

DISTILLS = ("kl", "mse")
AUGMENTS = ("none", "flip", "crop", "mix")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """kind: "kl" (kd_loss) or "mse" (logit_mse)."""
    if kind == "kl":
        return kd_loss(student_logits, teacher_logits)
    if kind == "mse":
        return logit_mse(student_logits, teacher_logits)
    raise ValueError(f"distillation loss must be one of {', '.join(DISTILLS)}, got {kind!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's log-softmax against the teacher's softmax."""
    return -(F.softmax(teacher_logits, 1) * F.log_softmax(student_logits, 1)).sum(1).mean()


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the logits, each row centred (softmax ignores a shared shift)."""
    s = student_logits - student_logits.mean(1, keepdim=True)
    t = teacher_logits - teacher_logits.mean(1, keepdim=True)
    return (s - t).pow(2).mean()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of each output's squared error relative to the float output's power."""
    terms = [(student[n] - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12) for n, t in teacher.items()]
    return torch.stack(terms).mean()


class Capture:
    """Forward hooks that keep the latest output of each named module."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def fn(mod, inputs, out):
            self.out[name] = out
        return fn

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a normalized N x 3 x H x W batch (see CoraSettings.augment); deterministic under gen."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    if mode in ("crop", "mix"):
        out = []
        for img in x:
            u = torch.rand(4, generator=gen).tolist()
            area = h * w * (0.25 + 0.75 * u[0])
            ratio = math.exp(math.log(3 / 4) + u[1] * math.log(16 / 9))
            ch = max(1, min(h, round(math.sqrt(area / ratio))))
            cw = max(1, min(w, round(math.sqrt(area * ratio))))
            top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
            out.append(F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                                     align_corners=False))
        x = torch.cat(out)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mode == "mix" and n > 1:
        lam = torch.rand(n, 1, 1, 1, generator=gen)
        x = lam * x + (1 - lam) * x.roll(1, 0)
    return x
