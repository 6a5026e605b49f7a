"""How a synchronous CUDA-graph execution waits for its done event: asleep until shortly
before the expected end, then checking, then blocked once the checks have run too long."""

from __future__ import annotations

import time

import pytest

from enginehouse.backends import cuda_graphs
from enginehouse.backends.cuda_graphs import CudaGraphEngine


class FakeEvent:
    """A done event that turns done at a set time; records how it was waited for."""

    def __init__(self, done_at: float) -> None:
        self.done_at = done_at
        self.queries: list[float] = []
        self.synchronized = False

    def query(self) -> bool:
        now = time.perf_counter()
        self.queries.append(now)
        return now >= self.done_at

    def synchronize(self) -> None:
        self.synchronized = True
        while time.perf_counter() < self.done_at:
            time.sleep(0.0001)


def waiting_engine(event: FakeEvent) -> CudaGraphEngine:
    engine = CudaGraphEngine.__new__(CudaGraphEngine)
    engine._done = event
    return engine


def test_an_unknown_end_blocks_on_the_event() -> None:
    event = FakeEvent(time.perf_counter() + 0.002)
    waiting_engine(event)._wait(0.0)
    assert event.synchronized and not event.queries


def test_a_known_end_is_slept_towards_then_checked_without_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Checks that run longer than this block; a loaded machine may preempt the test's
    # thread between two checks for a few milliseconds, which is not what is tested here.
    monkeypatch.setattr(cuda_graphs, "SPIN_S", 0.05)
    now = time.perf_counter()
    event = FakeEvent(now + 0.02)
    waiting_engine(event)._wait(now + 0.02)
    assert not event.synchronized
    # Asleep until shortly before the end: no check in the first part of the wait.
    assert event.queries[0] >= now + 0.02 - cuda_graphs.SPIN_EARLY_S - 0.005
    assert time.perf_counter() >= event.done_at


def test_a_late_end_stops_the_checks_and_blocks() -> None:
    now = time.perf_counter()
    event = FakeEvent(now + 0.3)
    waiting_engine(event)._wait(now + 0.001)  # expected far too early
    assert event.synchronized
    # The checks stopped long before the end (SPIN_S after the expected end, with room
    # for a loaded machine's preemptions), and the wait then blocked until it.
    assert event.queries[-1] <= now + 0.001 + cuda_graphs.SPIN_S + 0.2
    assert time.perf_counter() >= event.done_at
