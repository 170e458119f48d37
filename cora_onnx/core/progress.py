"""Progress of long phases: what is counted, how far, and the time left, logged at least every
`INTERVAL` seconds whatever the pace of the work, and each phase's seconds kept for the report.

A `Progress` counts the items of one phase (batches, layers, steps). It logs a line when an item
ends and `interval` seconds have passed since the last line, and a heartbeat (a daemon thread of
the clock) logs one too when no item ends for that long: a single slow item (a forward pass of a
large batch on a loaded machine) never leaves the log silent. A phase with no count (one opaque
call, e.g. the ONNX export) says how long it has run. Phases nest: while an inner phase runs, only
it logs (the outer one's heartbeat waits). `Phases` names the phases of one run and keeps their
wall and process CPU seconds.

The clock is injectable (`Clock`: now, cpu and every), so a test drives time by hand: no sleeps.
Lines go to the `cora_onnx` logger at INFO (the CLI prints them on stderr; `-q` hides them); the
environment variable CORA_ONNX_PROGRESS_SECONDS sets another interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["INTERVAL", "Clock", "Progress", "Phases", "progress"]

T = TypeVar("T")
log = logging.getLogger("cora_onnx")

INTERVAL = 20.0  # seconds between two progress lines at most (heartbeat checks HEARTBEAT times as often)
HEARTBEAT = 10
INTERVAL_ENV = "CORA_ONNX_PROGRESS_SECONDS"  # overrides INTERVAL (e.g. 5 for more lines; tests: 0.001)


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV)
    if not text:
        return INTERVAL
    try:
        value = float(text)
    except ValueError:
        return INTERVAL
    return value if value > 0 else INTERVAL


class Clock:
    """Real time: `now` (monotonic seconds), `cpu` (this process's CPU seconds, all threads) and
    `every(seconds, fn)`: call fn every `seconds` from a daemon thread until the returned stop
    function is called."""

    def now(self) -> float:
        return time.monotonic()

    def cpu(self) -> float:
        return time.process_time()

    def every(self, seconds: float, fn: Callable[[], None]) -> Callable[[], None]:
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(seconds):
                fn()

        thread = threading.Thread(target=run, name="cora-onnx progress", daemon=True)
        thread.start()

        def cancel() -> None:
            stop.set()
            thread.join()

        return cancel


REAL_CLOCK = Clock()
_ACTIVE: list["Progress"] = []  # the phases running, outermost first: only the innermost logs
_ACTIVE_LOCK = threading.Lock()


def _seconds(s: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if s < 100:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Progress:
    """One phase: `desc` (what runs), `total` items of `unit` (None: not counted). Use as a context
    manager: `with Progress("statistics", 16, "batches") as p: ... p.advance()`. On exit it logs the
    phase's count and seconds (`seconds`, `cpu_seconds` stay readable); lines between come at most
    `interval` seconds apart: `desc: 5/16 batches (31%), 42.0 s, about 1 min 32 s left`."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "", *, interval: float | None = None,
                 clock: Clock | None = None, logger: logging.Logger | None = None, quiet_end: bool = False,
                 work: float | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.work_total, self.work_done = work, 0.0
        self.interval = float(interval) if interval is not None else _interval()
        self.clock = clock or REAL_CLOCK
        self.log = logger or log
        self.quiet_end = quiet_end
        self.done = 0
        self.lines = 0
        self.seconds = self.cpu_seconds = 0.0
        self._lock = threading.Lock()
        self._stop: Callable[[], None] | None = None
        self._start = self._cpu0 = self._last = None

    def __enter__(self) -> "Progress":
        self._start = self._last = self.clock.now()
        self._cpu0 = self.clock.cpu()
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        if self.log.isEnabledFor(logging.INFO):
            self._stop = self.clock.every(max(self.interval / HEARTBEAT, 0.05), self.tick)
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        self.seconds = self.clock.now() - self._start
        self.cpu_seconds = self.clock.cpu() - self._cpu0
        if exc[0] is None and not (self.quiet_end and self.lines == 0):
            count = f"{self.done}{'' if self.total is None else '/' + str(self.total)} {self.unit} in " \
                if self.unit else ""
            self.log.info("%s: done, %s%s", self.desc, count, _seconds(self.seconds))

    def advance(self, n: int = 1, work: float | None = None) -> None:
        """`n` more items done (`work`: their share of the phase's `work`, when items differ in cost:
        the time left is then reckoned on the work); logs a line when one is due."""
        with self._lock:
            self.done += n
            self.work_done += n if work is None else work
        self.tick()

    def tick(self) -> None:
        """Log a line if `interval` seconds have passed since the last one (the heartbeat calls it);
        while a phase inside this one runs, it logs instead."""
        with self._lock:
            now = self.clock.now()
            if self._start is None:
                return
            with _ACTIVE_LOCK:
                inner = bool(_ACTIVE) and _ACTIVE[-1] is not self and self in _ACTIVE
            if inner:
                self._last = now
                return
            if now - self._last < self.interval:
                return
            self._last = now
            self.lines += 1
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """`desc: done/total unit (pct), elapsed, about T left` (what is known of it)."""
        elapsed = (self.clock.now() if now is None else now) - self._start
        if self.total is None:
            count = f"{self.done} {self.unit}, " if self.unit and self.done else ""
            return f"{self.desc}: {count}{_seconds(elapsed)} so far"
        head = f"{self.desc}: {self.done}/{self.total} {self.unit}".rstrip()
        if self.total > 0:
            head += f" ({100.0 * self.done / self.total:.0f}%)"
        if self.done <= 0:
            return f"{head}, {_seconds(elapsed)}, time left not known yet"
        if self.work_total and self.work_done > 0:
            left = elapsed / self.work_done * max(self.work_total - self.work_done, 0.0)
        else:
            left = elapsed / self.done * max(self.total - self.done, 0)
        return f"{head}, {_seconds(elapsed)}, about {_seconds(left)} left"

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield the items, advancing after each."""
        for item in items:
            yield item
            self.advance()


class Phases:
    """The named phases of one run, in order, each a `Progress` whose wall and CPU seconds are
    kept when it ends: `with phases("statistics", 16, "batches") as p: ...`; `to_json()` gives
    {name: {"seconds", "cpu_seconds"}} (a phase run twice adds up)."""

    def __init__(self, prefix: str = "", *, interval: float | None = None, clock: Clock | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.prefix, self.interval, self.clock, self.log = prefix, interval, clock, logger
        self.record: dict[str, dict[str, float]] = {}

    def __call__(self, name: str, total: int | None = None, unit: str = "", desc: str | None = None,
                 work: float | None = None) -> Progress:
        phases = self

        class _Phase(Progress):
            def __exit__(self, *exc) -> None:
                super().__exit__(*exc)
                rec = phases.record.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0})
                rec["seconds"] += self.seconds
                rec["cpu_seconds"] += self.cpu_seconds

        return _Phase(desc or f"{self.prefix}{name}", total, unit, interval=self.interval, clock=self.clock,
                      logger=self.log, work=work)

    def to_json(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v["seconds"], 3), "cpu_seconds": round(v["cpu_seconds"], 3)}
                for k, v in self.record.items()}


def progress(items: Iterable[T], total: int, desc: str, unit: str = "", *, clock: Clock | None = None,
             interval: float | None = None) -> Iterator[T]:
    """Yield items while logging progress (see `Progress`): at least every `interval` seconds, and
    a last line with the count and seconds when the phase took that long."""
    with Progress(desc, total, unit, clock=clock, interval=interval, quiet_end=True) as p:
        yield from p.wrap(items)
