"""Instances whose engine launches work and returns (as CUDA graphs do): the event loop's
thread gathers and launches, then polls; the instance thread is not used."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from enginehouse.backends.base import Engine, Launched, Placement
from enginehouse.messages import OutputTargets, Tensor
from enginehouse.runtime.instance import EARLY_S, Instance


class _Doubled(Launched):
    """Doubling on a device of its own (a worker thread), after ``delay_s``."""

    def __init__(self, work: Future[np.ndarray], expected_at: float) -> None:
        self.work = work
        self.expected_at = expected_at
        self.checks: list[float] = []

    def done(self) -> bool:
        self.checks.append(time.perf_counter())
        return self.work.done()

    def outputs(self) -> list[np.ndarray]:
        return [self.work.result()]


class DoublingEngine(Engine):
    """Doubles INPUT0 on a worker thread; launches batches of up to ``max_rows`` rows."""

    launches = True

    def __init__(self, delay_s: float = 0.0, max_rows: int = 8) -> None:
        self.delay_s = delay_s
        self.max_rows = max_rows
        self.device = ThreadPoolExecutor(max_workers=1)
        self.launched: list[_Doubled] = []
        self.threads: dict[str, int] = {}

    def _double(self, array: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return array * 2

    def gather(
        self, parts: dict[str, list[Tensor]], output_targets: OutputTargets | None = None
    ) -> dict[str, np.ndarray]:
        self.threads["gather"] = threading.get_ident()
        return super().gather(parts, output_targets)

    def launch(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> Launched | None:
        if inputs["INPUT0"].shape[0] > self.max_rows:
            return None
        if inputs["INPUT0"].dtype == np.int8:
            raise ValueError("int8 is not supported")
        self.threads["launch"] = threading.get_ident()
        work = self.device.submit(self._work, inputs["INPUT0"].copy())
        launched = _Doubled(work, time.perf_counter() + self.delay_s)
        self._armed(launched)
        self.launched.append(launched)
        return launched

    def _work(self, array: np.ndarray) -> np.ndarray:
        """What the device runs for one launch."""
        return self._double(array)

    def _armed(self, launched: _Doubled) -> None:
        """Where a launch's end will be signalled (nowhere: the loop polls)."""

    def execute(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        self.threads["execute"] = threading.get_ident()
        return [self._double(inputs["INPUT0"])]

    def close(self) -> None:
        self.device.shutdown(wait=True)


def _run(instance: Instance, parts: list[np.ndarray]) -> asyncio.Future:  # type: ignore[type-arg]
    return instance.execute(lambda: instance.gather({"INPUT0": parts}), ["OUTPUT0"], list)


def _on_a_loop(instance: Instance, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on a new event loop, then close the instance whatever happened."""
    try:
        asyncio.run(main())
    finally:
        instance.close()


def test_launching_engines_gather_and_launch_on_the_event_loop() -> None:
    engine = DoublingEngine()
    instance = Instance("doubling", engine, Placement(0))

    async def main() -> None:
        parts = [np.arange(3, dtype=np.float32).reshape(1, 3), np.ones((2, 3), np.float32)]
        execution = await _run(instance, parts)
        np.testing.assert_array_equal(execution.outputs[0], np.concatenate(parts) * 2)
        loop_thread = threading.get_ident()
        assert engine.threads == {"gather": loop_thread, "launch": loop_thread}
        assert execution.input_ns > 0 and execution.infer_ns > 0

    _on_a_loop(instance, main)


def test_a_launch_is_not_checked_again_until_shortly_before_it_is_expected() -> None:
    engine = DoublingEngine(delay_s=0.05)
    instance = Instance("doubling", engine, Placement(0))

    async def main() -> None:
        execution = await _run(instance, [np.ones((4, 3), np.float32)])
        assert execution.outputs[0].sum() == 24
        (launched,) = engine.launched
        first, second = launched.checks[:2]
        # The first check comes with the launch; the next waits for the expected end.
        assert second >= launched.expected_at - EARLY_S - 0.002
        assert second - first > 0.03
        assert launched.checks[-1] >= launched.expected_at - 0.002

    _on_a_loop(instance, main)


def test_what_cannot_be_launched_runs_on_the_instance_thread() -> None:
    engine = DoublingEngine(max_rows=2)
    instance = Instance("doubling", engine, Placement(0))

    async def main() -> None:
        parts = [np.ones((3, 3), np.float32), np.ones((1, 3), np.float32)]
        execution = await _run(instance, parts)
        assert execution.outputs[0].shape == (4, 3) and execution.outputs[0].max() == 2
        assert engine.threads["execute"] != threading.get_ident()
        assert not engine.launched

    _on_a_loop(instance, main)


def test_a_failed_launch_fails_its_execution_and_the_instance_keeps_serving() -> None:
    engine = DoublingEngine()
    instance = Instance("doubling", engine, Placement(0))

    async def main() -> None:
        with pytest.raises(ValueError, match="int8"):
            await _run(instance, [np.ones((1, 3), np.int8)])
        execution = await _run(instance, [np.ones((1, 3), np.float32)])
        assert execution.outputs[0].tolist() == [[2.0, 2.0, 2.0]]

    _on_a_loop(instance, main)


class _PipeWaker:
    """The device thread writes one byte per finished launch (as CUDA's host function does)."""

    def __init__(self) -> None:
        self._read, self.write = os.pipe()
        os.set_blocking(self._read, False)
        self.received = 0

    def fileno(self) -> int:
        return self._read

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.received += len(os.read(self._read, 4096))

    def close(self) -> None:
        os.close(self._read)
        os.close(self.write)


class SignallingEngine(DoublingEngine):
    """Doubles on the worker thread, then wakes the event loop through the pipe."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.waker = _PipeWaker()
        self.armed = 0

    def _armed(self, launched: _Doubled) -> None:
        self.armed += 1
        launched.waker, launched.ticket = self.waker, self.armed
        # The byte is written once the work is done (as CUDA runs a host function only
        # after the work before it), never before its result can be read.
        launched.work.add_done_callback(lambda _: os.write(self.waker.write, b"!"))

    def close(self) -> None:
        super().close()
        self.waker.close()


def test_a_launch_with_a_waker_is_checked_when_woken_not_polled() -> None:
    engine = SignallingEngine(delay_s=0.03)
    instance = Instance("signalling", engine, Placement(0))

    async def main() -> None:
        for rows in (1, 3):
            execution = await _run(instance, [np.ones((rows, 3), np.float32)])
            assert execution.outputs[0].shape == (rows, 3)
        for launched in engine.launched:
            # Once at the launch, once when woken: never polled in between.
            assert len(launched.checks) == 2
        assert engine.waker.received == 2

    _on_a_loop(instance, main)


def test_an_execution_on_the_thread_tells_the_policy_what_its_hand_off_cost() -> None:
    engine = DoublingEngine(max_rows=0)  # nothing launches: every execution is threaded
    instance = Instance("doubling", engine, Placement(0))

    async def main() -> None:
        assert instance.policy.handoff_ns is None
        for _ in range(3):
            await _run(instance, [np.ones((1, 3), np.float32)])
        await asyncio.sleep(0)  # the done callbacks run once the loop turns
        handoff = instance.policy.handoff_ns
        assert handoff is not None and 0 <= handoff < 1e9

    _on_a_loop(instance, main)
