"""The `graph` fixture: a TinyGraph (tests/passes/tinygraph.py), no torch."""

import pytest

from tinygraph import TinyGraph


@pytest.fixture
def graph() -> TinyGraph:
    return TinyGraph()

