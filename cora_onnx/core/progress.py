"""Progress for long loops: a bar on a terminal, periodic log lines otherwise (CI, files)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress"]

T = TypeVar("T")
log = logging.getLogger("cora_onnx")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "") -> Iterator[T]:
    """Yield items while showing progress on stderr (tty) or logging every ~20%.

    unit names what is counted ("batches", "layers", "steps"), shown after the count."""
    if total <= 1:
        yield from items
        return
    if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
        import click

        with click.progressbar(items, length=total, label=f"{desc} ({unit})" if unit else desc, file=sys.stderr) as bar:
            yield from bar
        return
    start = time.perf_counter()
    step = max(1, -(-total // 5))
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            log.info("%s: %d/%d%s (%.1f s)", desc, i, total, f" {unit}" if unit else "", time.perf_counter() - start)
