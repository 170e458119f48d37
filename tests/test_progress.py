"""Progress lines (cora_onnx.core.progress) on a clock the test drives: no sleeps."""

import logging

import pytest

from cora_onnx.core.progress import INTERVAL, Phases, Progress, progress


class FakeClock:
    """now/cpu advance only when the test says so; `every` callbacks fire at their due times."""

    def __init__(self) -> None:
        self.t = 0.0
        self.timers: list[list] = []

    def now(self) -> float:
        return self.t

    def cpu(self) -> float:
        return self.t / 2  # as if half the wall time were this process's

    def every(self, seconds, fn):
        timer = [self.t + seconds, seconds, fn]
        self.timers.append(timer)
        return lambda: self.timers.remove(timer)

    def advance(self, dt: float) -> None:
        end = self.t + dt
        while self.timers and min(t[0] for t in self.timers) <= end:
            timer = min(self.timers, key=lambda t: t[0])
            self.t = timer[0]
            timer[0] += timer[1]
            timer[2]()
        self.t = end


class Lines(logging.Handler):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock, self.records = clock, []

    def emit(self, record) -> None:
        self.records.append((self.clock.t, record.getMessage()))


@pytest.fixture
def logged():
    clock = FakeClock()
    handler = Lines(clock)
    logger = logging.getLogger("cora_onnx.test_progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield clock, handler.records, logger
    logger.removeHandler(handler)


def test_a_long_phase_logs_at_least_every_30_seconds_with_count_and_time_left(logged):
    """Items of very different lengths, one of them 95 s long: never 30 s without a line."""
    clock, records, logger = logged
    steps = [3.0] * 20 + [95.0] + [0.5] * 200 + [41.0, 2.0, 7.0] * 5
    with Progress("statistics", len(steps), "batches", clock=clock, logger=logger) as p:
        for dt in steps:
            clock.advance(dt)
            p.advance()
    times = [0.0] + [t for t, _ in records]
    assert times[-1] == pytest.approx(sum(steps))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 30.0 and max(gaps) <= INTERVAL + INTERVAL / 10 + 1e-9
    middle = [m for _, m in records[:-1]]
    assert all(m.startswith("statistics: ") and "/236 batches" in m for m in middle)
    # during the 95 s item the count stands still but the lines go on, with the time left
    assert any("20/236 batches (8%)" in m and "left" in m for m in middle)
    assert records[-1][1].startswith("statistics: done, 236/236 batches in ")
    assert p.seconds == pytest.approx(sum(steps)) and p.cpu_seconds == pytest.approx(sum(steps) / 2)


def test_time_left_from_the_pace_so_far(logged):
    clock, records, logger = logged
    with Progress("grids", 10, "layers", clock=clock, logger=logger) as p:
        for _ in range(4):
            clock.advance(6.0)
            p.advance()
    # the heartbeat's line at 20 s: 3 layers in 20 s, 7 to go
    assert records[0] == (20.0, "grids: 3/10 layers (30%), 20.0 s, about 46.7 s left")


def test_an_uncounted_phase_says_how_long_it_has_run(logged):
    clock, records, logger = logged
    with Progress("export", clock=clock, logger=logger):
        clock.advance(125.0)
    assert [m for _, m in records] == [f"export: {t} so far" for t in ("20.0 s", "40.0 s", "60.0 s", "80.0 s",
                                                                       "1 min 40 s", "2 min 00 s")] + \
        ["export: done, 2 min 05 s"]


def test_short_loops_stay_quiet_and_phases_keep_their_seconds(logged):
    clock, records, logger = logged
    for _ in progress(range(5), 5, "verify", "batches", clock=clock):
        clock.advance(1.0)
    assert records == []  # `progress` logs nothing for a loop shorter than the interval
    phases = Phases(clock=clock, logger=logger)
    for name, dt in (("statistics", 12.0), ("grids", 3.0), ("statistics", 1.0)):
        with phases(name, 1, "batches"):
            clock.advance(dt)
    assert phases.to_json() == {"statistics": {"seconds": 13.0, "cpu_seconds": 6.5},
                                "grids": {"seconds": 3.0, "cpu_seconds": 1.5}}
    assert [m for _, m in records][0] == "statistics: done, 0/1 batches in 12.0 s"


def test_no_heartbeat_when_info_is_off(logged):
    clock, records, logger = logged
    logger.setLevel(logging.WARNING)
    with Progress("quiet", 3, "steps", clock=clock, logger=logger) as p:
        assert clock.timers == []
        clock.advance(100.0)
        p.advance()
    assert records == []


def test_an_outer_phase_waits_while_an_inner_one_logs(logged):
    clock, records, logger = logged
    with Progress("export", clock=clock, logger=logger):
        clock.advance(25.0)  # the outer phase alone: one line at 20 s
        with Progress("calibrating", 4, "batches", clock=clock, logger=logger) as inner:
            for _ in range(4):
                clock.advance(15.0)
                inner.advance()
        clock.advance(30.0)
    lines = [(t, m.split(":")[0]) for t, m in records]
    # the inner phase's lines (and its end at 85 s), then the outer one's 20 s after the inner's
    # last heartbeat (the heartbeat checks every 2 s)
    assert lines == [(20.0, "export"), (45.0, "calibrating"), (65.0, "calibrating"), (85.0, "calibrating"),
                     (85.0, "calibrating"), (104.0, "export"), (115.0, "export")]
    assert records[-1][1] == "export: done, 1 min 55 s"


def test_time_left_from_the_work_when_items_differ_in_cost(logged):
    clock, records, logger = logged
    cost = [1.0] * 4 + [7.0] * 4  # the last layers are the big ones: 12 s left at 20 s
    with Progress("grids", 8, "layers", clock=clock, logger=logger, work=sum(cost)) as p:
        for c in cost:
            clock.advance(c)
            p.advance(work=c)
    # by the work: 18 of 32 units in 20 s; by the count it would say 6.7 s (6 of 8 layers)
    assert records[0] == (20.0, "grids: 6/8 layers (75%), 20.0 s, about 15.6 s left")
