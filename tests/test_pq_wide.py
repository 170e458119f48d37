"""Product quantization of layers wider than quantizers.WIDE_K (VGG's classifier, K = 25,088): the
statistics, float target and error feedback they get, and the unchanged fits of every layer up
to that width. The wide routes are tried on small layers with WIDE_K lowered."""

import hashlib

import numpy as np
import pytest
import torch

from cora_onnx.onnx.data import ImageSet, Preprocess
from cora_onnx.torch import quantizers
from cora_onnx.torch.search import LayerSelection, PqSettings, search_pq
from cora_onnx.torch.search.pq import codebook, search, statistics
from cora_onnx.torch.search.pq.codebook import PqFit, assign_with_feedback, fit_codebook, float_target
from cora_onnx.torch.search.pq.statistics import SecondMoment
from digests import same_machine


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


def _wide_k(monkeypatch, value: int) -> None:
    """WIDE_K as every PQ module sees it."""
    for module in (codebook, search, statistics):
        monkeypatch.setattr(module, "WIDE_K", value)


def _search(target: str):
    torch.manual_seed(0)
    model = _Net().eval()
    settings = PqSettings(codewords=16, em_iters=4, finetune_steps=2, calib_size=48, stats_size=48, target=target,
                          selection=LayerSelection(keep=("first",)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return search_pq(model, settings, _images())
    finally:
        torch.set_num_threads(threads)


def _digest(target: str) -> str:
    """Codewords, codes, scales, biases and error measures of a PQ search (error feedback, bias
    correction, two fine-tuning steps) of _Net, on one thread (torch's sums depend on the threads)."""
    plan = _search(target)
    sha = hashlib.sha256()
    for lp in plan.layers:
        for part in (lp.codebook, lp.uniform):
            if part is not None:
                for value in vars(part).values():
                    if isinstance(value, np.ndarray):
                        sha.update(value.tobytes())
        sha.update(repr(sorted((k, v) for k, v in lp.info.items() if k != "seconds")).encode())
    return sha.hexdigest()[:16]


@pytest.mark.parametrize("wide_k", [quantizers.WIDE_K, 256])
@pytest.mark.parametrize("target", ["float", "weight"])
@same_machine
def test_ordinary_widths_keep_the_fits_they_had(monkeypatch, target, wide_k):
    """Up to WIDE_K (here also at K == WIDE_K, fc1) every codeword, code, scale, bias and error
    measure is the one the code before the wide route gave (the digests were taken from it, commit
    ae806f2)."""
    _wide_k(monkeypatch, wide_k)
    assert _digest(target) == {"float": "642a759e7c1051a2", "weight": "84efebf504bbfb98"}[target]


@pytest.mark.parametrize("target", ["float", "weight"])
def test_wide_layers_are_fitted_without_the_float_measures(monkeypatch, target):
    """With fc1 (K = 256) above WIDE_K the search runs the wide route (statistics in spans): fc1 is
    product-quantized with its error under the diagonal blocks and without the float-output
    measures; the other layers keep them."""
    _wide_k(monkeypatch, 64)
    plan = _search(target)
    fc1, fc2 = plan.layer("fc1").info, plan.layer("fc2").info
    assert plan.layer("fc1").codebook is not None and 0 < fc1["activation_weighted_error"] < 1
    assert "float_output_error" not in fc1 and "full_error_without_feedback" not in fc1
    assert ("float_output_error" in fc2) == (target == "float") and "full_error_without_feedback" in fc2


@pytest.mark.parametrize("centered", [False, True])
def test_span_stats_are_the_spans_of_the_joint_moments(centered):
    """span_stats, a wide layer's statistics without a K x K: the diagonal span blocks of
    joint_stats' E[x_q x_q^T], the means, and the float target's correction (H_qf - H_qq) W^T
    summed without either moment (here a grouped conv, K = 36 per group, spans of 27); without
    the float network's inputs the same blocks and means."""
    conv = torch.nn.Conv2d(8, 6, 3, padding=1, groups=2)
    g = torch.Generator().manual_seed(8)
    xq = [torch.relu(torch.randn(4, 8, 5, 5, generator=g)) + 0.5 for _ in range(3)]
    xf = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xq]
    geom = statistics.Geom("conv", "kxk", 9, 2, 4)
    joint = statistics.joint_stats(None, conv, None, conv, geom, None, 4, centered=centered, pairs=zip(xq, xf))
    w = conv.weight.detach().reshape(6, -1)
    st = statistics.span_stats(conv, geom, 27, zip(xq, xf), w=w, centered=centered)
    want = codebook.Spans.of(joint["qq"], 27)
    assert [b.shape for b in st["qq"].blocks] == [(2, 27, 27), (2, 9, 9)]
    for got, exp in zip(st["qq"].blocks, want.blocks):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["residual"], (joint["qf"] - joint["qq"]) @ w.reshape(2, 3, 36).transpose(1, 2),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st["mu_q"], joint["mu_q"])
    torch.testing.assert_close(st["mu_f"], joint["mu_f"])
    alone = statistics.span_stats(conv, geom, 27, xq, centered=centered)
    assert "residual" not in alone and torch.equal(alone["mu_q"], st["mu_q"])
    assert all(torch.equal(a, b) for a, b in zip(alone["qq"].blocks, st["qq"].blocks))
    torch.testing.assert_close(st["qq"].blocks_of(9), codebook._blocks_of(joint["qq"], 9), rtol=1e-5, atol=1e-6)


def test_unique_rows_is_torch_unique():
    """The EM's distinct sub-vectors (O(n) memory): torch.unique(dim=0)'s rows in its order."""
    g = torch.Generator().manual_seed(9)
    for d in (1, 4, 9):
        v = torch.randint(-2, 3, (600, d), generator=g).float() / 2
        v[::5] = torch.randn(120, d, generator=g)
        assert torch.equal(codebook._unique_rows(v), torch.unique(v, dim=0))


def _correlated(k: int, n: int, seed: int) -> torch.Tensor:
    """(n, k) post-ReLU-like rows with correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) / k ** 0.5 + 0.3)


def _block_diagonal(h: torch.Tensor, span: int) -> torch.Tensor:
    return torch.block_diag(*[h[i:i + span, i:i + span] for i in range(0, h.shape[0], span)])


def test_wide_float_target_is_exact_on_uncorrelated_spans(monkeypatch):
    """Above WIDE_K the float target inverts H_qq span by span: the exact least-squares target when
    the spans' inputs are uncorrelated, and the float weight itself when both networks' inputs agree."""
    k, span = 48, 16
    xq = _correlated(k, 200, 1)
    xf = xq + 0.1 * _correlated(k, 200, 2)
    h_qq = _block_diagonal(xq.T @ xq / 200, span)[None]
    h_qf = _block_diagonal(xq.T @ xf / 200, span)[None]
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(3))
    exact = float_target(w, h_qq, h_qf)
    _wide_k(monkeypatch, span)
    torch.testing.assert_close(float_target(w, h_qq, h_qf), exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(float_target(w, h_qq, h_qq), w, rtol=1e-4, atol=1e-5)
    spans = codebook.Spans.of(h_qq, span)  # as the search gives them: the spans and the correction
    residual = (h_qf - h_qq) @ w.T
    torch.testing.assert_close(codebook.float_target_spans(w, spans, residual), exact, rtol=1e-4, atol=1e-5)


def test_wide_feedback_is_the_feedback_within_its_spans(monkeypatch):
    """Above WIDE_K the sequential assignment takes spans of WIDE_K // d blocks alone (errors pushed
    in lazy batches): with no cross terms between the spans it assigns as the whole-matrix route
    does, and on a full H it still lowers the full-covariance error of the EM's codes."""
    o, m, d, span = 24, 12, 4, 16
    x = _correlated(m * d, 400, 4)
    h = (x.T @ x / 400)[None]
    w = torch.randn(o, m, d, generator=torch.Generator().manual_seed(5))
    blocks = torch.diagonal(h.reshape(1, m, d, m, d), dim1=1, dim2=3).permute(0, 3, 1, 2)
    fit = fit_codebook(w, blocks, 16, 5)
    diagonal = _block_diagonal(h[0], span)[None]
    whole = assign_with_feedback(w, diagonal, fit)
    before = codebook.full_error(w, h, fit.weight())
    _wide_k(monkeypatch, span)
    spans = assign_with_feedback(w, diagonal, fit)
    assert (spans.codes == whole.codes).float().mean() > 0.99
    assert spans.error == pytest.approx(codebook.weighted_error(w, blocks, spans.weight()))
    assert codebook.full_error(w, h, assign_with_feedback(w, h, fit).weight()) < before


def test_wide_moments_are_float32_and_spent():
    """A float32 sum gives nearly the float64 moments, in its own memory (moment(spend=True))."""
    xq, xf = _correlated(40, 300, 6), _correlated(40, 300, 7)
    sums = {dtype: SecondMoment(40, 2, dtype=dtype) for dtype in (torch.float64, torch.float32)}
    for acc in sums.values():
        for i in range(0, 300, 100):  # two groups: the inputs and their halves
            a = torch.stack([xq[i:i + 100].T, xq[i:i + 100].T / 2])
            b = torch.stack([xf[i:i + 100].T, xf[i:i + 100].T / 2])
            acc.add(a, b)
    exact = sums[torch.float64].moment(centered=True)
    acc = sums[torch.float32]
    spent = acc.moment(centered=True, spend=True)
    assert spent.dtype == torch.float32 and acc.ab is None
    torch.testing.assert_close(spent.double(), exact, rtol=1e-4, atol=1e-6)
