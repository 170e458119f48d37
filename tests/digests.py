"""Digest tests pin exact float results (that a refactoring changed nothing): the sums behind them
depend on the CPU's vector width and on torch's build, so they run only where they were taken."""

import pytest
import torch

TAKEN_ON = ("2.14.1", "AVX512")

same_machine = pytest.mark.skipif(
    (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()) != TAKEN_ON,
    reason=f"digest taken with torch {TAKEN_ON[0]} on an {TAKEN_ON[1]} CPU; float sums differ elsewhere "
           f"(here torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()})")
