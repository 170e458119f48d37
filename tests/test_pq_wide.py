"""Product quantization of layers wider than quantizers.WIDE_K (VGG's classifier, K = 25,088): the
statistics, float target and error feedback they get, and the unchanged fits of every layer up
to that width. The wide routes are tried on small layers with WIDE_K lowered."""

import hashlib

import numpy as np
import pytest
import torch

from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq


class _Net(torch.nn.Module):
    """A kept first conv, a grouped 3x3 conv (K = 36 per group), a Linear of K = 256 and the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.fc1 = torch.nn.Linear(256, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _images(n: int = 48, size: int = 8) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy(), None,
                    tuple(map(str, range(n))), Preprocess(input_size=size))


def _digest(target: str) -> str:
    """Codewords, codes, scales, biases and error measures of a PQ search (error feedback, bias
    correction, two fine-tuning steps) of _Net, on one thread (torch's sums depend on the threads)."""
    torch.manual_seed(0)
    model = _Net().eval()
    settings = PqSettings(codewords=16, em_iters=4, finetune_steps=2, calib_size=48, stats_size=48, target=target,
                          selection=LayerSelection(keep=("first",)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = search_pq(model, settings, _images())
    finally:
        torch.set_num_threads(threads)
    sha = hashlib.sha256()
    for lp in plan.layers:
        for part in (lp.codebook, lp.uniform):
            if part is not None:
                for value in vars(part).values():
                    if isinstance(value, np.ndarray):
                        sha.update(value.tobytes())
        sha.update(repr(sorted((k, v) for k, v in lp.info.items() if k != "seconds")).encode())
    return sha.hexdigest()[:16]


@pytest.mark.parametrize("target", ["float", "weight"])
def test_ordinary_widths_keep_the_fits_they_had(target):
    """Up to WIDE_K every codeword, code, scale, bias and error measure is the one the code before
    the wide route gave (the digests were taken from it, commit ae806f2)."""
    assert _digest(target) == {"float": "642a759e7c1051a2", "weight": "84efebf504bbfb98"}[target]
