"""A random low-rank adapter for plan-level tests (tests/ and tests/passes/ both import it: the root
conftest puts this folder on sys.path)."""

import numpy as np

from cora_onnx.core.plan import LowRankAdapter


def random_adapter(shape, rank, bits, scale=0.05, seed=1):
    """A (rank, C_in, kh, kw) x (C_out, rank, 1, 1) adapter with values of about `scale`; bits: its
    factors on symmetric per-row grids of that width (None: float)."""
    rng = np.random.default_rng(seed)
    a = (scale * rng.normal(size=(rank,) + tuple(shape[1:]))).astype(np.float32)
    b = (scale * rng.normal(size=(shape[0], rank, 1, 1))).astype(np.float32)
    if bits is None:
        return LowRankAdapter(rank, a, b)
    lim = (1 << (bits - 1)) - 1
    sa = (np.abs(a).reshape(rank, -1).max(1) / lim).astype(np.float32)
    sb = (np.abs(b).reshape(shape[0], -1).max(1) / lim).astype(np.float32)
    a = (np.round(a / sa[:, None, None, None]) * sa[:, None, None, None]).astype(np.float32)
    b = (np.round(b / sb[:, None, None, None]) * sb[:, None, None, None]).astype(np.float32)
    return LowRankAdapter(rank, a, b, bits=bits, a_scale=sa, b_scale=sb)
