"""Channels-last against contiguous image batches on CPU: a forward pass (what predict_torch does
when it scores a model) and a distillation step (forward + backward, as the size-target
fine-tuning), on BatchNorm-fused EfficientNet-Lite0 (the package's weights) and ResNet-18
(../shared, or torchvision's random weights without it). The two layouts alternate so machine load
hits both alike; prints medians and the ratio. Run it alone on the machine.

    python tools/bench_channels_last.py [--batch 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cora_onnx.torch.export import fuse_batchnorm
from cora_onnx.torch.models import build_model, packaged_weights
from imagenette import SHARED


def _models():
    yield "efficientnet_lite0", build_model("efficientnet_lite0", packaged_weights("efficientnet_lite0"))
    r18 = SHARED / "models" / "resnet18-imagenet.pt"
    yield "resnet18", build_model("resnet18", r18 if r18.exists() else None)


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for name, model in _models():
        model = fuse_batchnorm(model.eval(), 224)
        x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        layouts = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}

        def forward(t):
            with torch.inference_mode():
                model(t)

        def step(t):
            model.zero_grad(set_to_none=True)
            model(t).pow(2).mean().backward()

        for what, fn in (("forward", forward), ("step", step)):
            times = {k: [] for k in layouts}
            for k, t in layouts.items():  # warm-up
                fn(t)
            for _ in range(args.repeats):
                for k, t in layouts.items():
                    times[k].append(_seconds(lambda: fn(t)))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:20s} {what:8s} contiguous {med['contiguous']:.3f} s  channels_last "
                  f"{med['channels_last']:.3f} s  ratio {med['contiguous'] / med['channels_last']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
