"""Cost of one CoRa rank-search step (forward + backward, ResNet-18 from ../shared, W4): the
Butterworth-weighted correction merged into the conv weight (what cora-onnx does) against the
reference's formulation, two extra full-rank convolutions per layer (x -> A_T (R channels) -> B_T).
Steps alternate between the two so machine load hits both alike; prints medians and the ratio.

    python tools/bench_cora_step.py [--batch 16] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cora_onnx.torch.export import fuse_batchnorm
from cora_onnx.torch.search.cora import CoraSettings, SearchLayer, set_module, butterworth
from cora_onnx.torch.export import quantizable_layers
from cora_onnx.torch.quantizers import quantize_weight
from cora_onnx.run.stages import load_model
from imagenette import SHARED, weights_path


class _TwoConvs(SearchLayer):
    """The reference formulation: conv(x, W_q) + B_T(A_T(x)) with full-rank A_T and B_T."""

    def forward(self, x):
        t = butterworth(self.c, self.full_rank, self.order)
        a = (self.v * t[:, None]).reshape((self.full_rank,) + self.shape[1:])
        b = (self.us * t).reshape(self.shape[0], self.full_rank, 1, 1)
        y = F.conv2d(x, self.wq.reshape(self.shape), self.bias, **self.conv_args)
        return y + F.conv2d(F.conv2d(x, a, None, **self.conv_args), b)


def build(model, cls):
    model = fuse_batchnorm(model)
    s = CoraSettings(bits=4)
    for name, mod in list(quantizable_layers(model).items()):
        if not isinstance(mod, torch.nn.Conv2d) or name == "conv1":
            continue
        w = mod.weight.detach()
        wq = quantize_weight(w, s.spec(4)).dequantize()
        u, sv, v = torch.linalg.svd((w - wq).reshape(w.shape[0], -1), full_matrices=False)
        set_module(model, name, cls(mod, wq, (u * sv, v), 4, 0.1))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model("resnet18", weights_path("resnet18", args.shared))
    models = {"merged into the weight": build(base, SearchLayer), "two extra convs (reference)": build(base, _TwoConvs)}
    x = torch.randn(args.batch, 3, 224, 224)
    times = {k: [] for k in models}
    for step in range(args.steps + 1):
        for k, m in models.items():
            params = [p for n, p in m.named_parameters() if n.endswith(".c")]
            t0 = time.perf_counter()
            m(x).logsumexp(1).mean().backward()
            dt = time.perf_counter() - t0
            for p in params:
                p.grad = None
            if step:  # the first step warms up
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<30} {v:7.2f} s/step (median of {args.steps}, batch {args.batch}, {torch.get_num_threads()} threads)")
    a, b = med.values()
    print(f"ratio reference / merged: {b / a:.2f}x")


if __name__ == "__main__":
    main()
