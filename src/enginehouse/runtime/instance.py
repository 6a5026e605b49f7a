"""An execution instance: one engine and the thread that runs it.

Kernels run on the instance's own thread, so the event loop keeps serving and several
instances run in parallel outside the GIL (ONNX Runtime and PyTorch release it). Handing
a request to a thread and back costs tens of microseconds of wake-ups and GIL
hand-offs, which is more than a small model takes to run; :class:`InlinePolicy` runs
such executions on the event loop thread instead, judged by what the instance measured.
Engines that launch work on a device without waiting for it (CUDA graphs) skip the thread
altogether: the event loop gathers and launches, and learns of the end from the device's
waker or by polling (:class:`_LaunchWatch`), so no GIL hand-off lies on the path. The
instance measures the three compute phases Triton reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from enginehouse.backends.base import Engine, Launched, Placement
from enginehouse.messages import OutputTargets, Tensor
from enginehouse.runtime.spare_cores import spare_cores

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Execution:
    """The outputs of one execution and how long each phase took (ns)."""

    outputs: list[np.ndarray]
    input_ns: int
    infer_ns: int
    output_ns: int

    def short_output(self, names: Sequence[str], rows: int) -> str | None:
        """What is wrong when an output of a batch of ``rows`` has fewer rows (a model that
        reduces over the batch, say): split per request, it would fail or hand out another
        request's data."""
        for name, array in zip(names, self.outputs):
            if array.ndim == 0 or array.shape[0] < rows:
                return (
                    f"output '{name}' has shape {list(array.shape)} for a batch of {rows} "
                    "rows; a model with max_batch_size > 0 must return the batch as each "
                    "output's first dimension"
                )
        return None


PrepareInputs = Callable[[], dict[str, np.ndarray]]
# Makes a new, warmed instance (name, placement): used to replace one that failed.
InstanceFactory = Callable[[str, Placement], "Instance"]
FinishOutputs = Callable[[list[np.ndarray]], list[np.ndarray]]

# A launched execution is first checked this long before the engine expects it to end, and
# then at every turn of the event loop: an idle loop's timers wake up to a millisecond late
# (epoll counts in milliseconds), and every check after the first costs a turn.
EARLY_S = 0.0012
# At most this many times its threshold does an inline policy allow an execution on the
# event loop because hand-offs to the thread cost that much: a model that computes for
# longer still runs on its thread, whatever the hand-offs cost, so the loop is never
# blocked for longer than about this (1 ms by default).
HANDOFF_FACTOR = 10


class InlinePolicy:
    """Decides per execution whether to run on the event loop thread.

    ``mode`` "auto" runs inline while the moving average of inline execution times stays
    under ``threshold_ns``; "always" and "never" fix the choice. While no core of the
    machine is idle (``spare``, runtime/spare_cores.py), the thread cannot run beside the
    loop anyway, and the limit is what handing an execution to the thread currently costs
    where that is more than the threshold (up to :data:`HANDOFF_FACTOR` times it): an
    execution shorter than its own hand-off is then cheaper on the loop in every way. With
    cores to spare the threshold holds, so instances keep computing in parallel. A request
    larger than any the instance has measured (warm-up runs every batch size it expects) is
    judged by that time scaled to its bytes, so a model measured fast on small tensors is
    not run inline on a huge one.
    Only inline executions are measured: on the instance thread, a run's wall time includes
    waiting for the GIL, which says nothing about the model. An instance that went to its
    thread tries inline again every ``probe_every`` executions (no larger than those
    measured), so a model that was slow only while cold comes back; one that runs inline
    only because hand-offs cost more than the threshold goes to its thread as often, so the
    hand-off's cost is measured again. The first execution of an instance runs in its thread
    (a large model must not stall the event loop even once) and seeds the average, unless
    warm-up already did.

    A 1 MB identity model on the 2-core machine ran in 31-46 us; handed to its thread each
    request cost 430-560 us of CPU in all, run inline 130-180 us: the hand-offs' context
    switches, not the data, were the cost. On a slower, busier 2-core machine the same model
    ran in about 215 us, over the threshold, and a hand-off took longer still: with 1 MB in
    shared memory it served 1,102-1,227 req/s on its thread against 1,661 inline.
    """

    def __init__(
        self,
        mode: str = "auto",
        threshold_ns: int = 100_000,
        probe_every: int = 64,
        spare: Callable[[], float] = spare_cores,
    ) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"inline execution mode must be auto, always or never, not {mode!r}")
        self.mode = mode
        self.threshold_ns = threshold_ns
        self.probe_every = probe_every
        self._spare = spare
        self._average_ns: float | None = None
        # Moving average of what a hand-off to the thread added to an execution (ns).
        self._handoff_ns: float | None = None
        # Above this a measured time says only "too slow for the loop, whatever the limit".
        self._ceiling_ns = 2.0 * HANDOFF_FACTOR * threshold_ns
        # The largest inputs measured, in bytes.
        self._largest_bytes = 1
        self._skipped = 0

    @property
    def average_ns(self) -> float | None:
        """Moving average of the inline executions' time; None before the first run."""
        return self._average_ns

    @property
    def handoff_ns(self) -> float | None:
        """Moving average of what a hand-off to the thread adds; None before one ran there."""
        return self._handoff_ns

    @property
    def limit_ns(self) -> float:
        """The execution time under which ``auto`` runs inline while no core is idle: the
        threshold, or the hand-off's cost where that is more."""
        return max(float(self.threshold_ns), self._handoff_ns or 0.0)

    def inline(self, input_bytes: int) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        average = self._average_ns
        if average is None:
            return False
        larger = input_bytes > self._largest_bytes
        if larger:
            average *= input_bytes / self._largest_bytes
        if average < self.threshold_ns:
            return True
        if average < self.limit_ns and self._spare() < 1.0:
            # Inline only because hand-offs cost more: now and then one, to measure that again.
            self._skipped += 1
            if self._skipped >= self.probe_every:
                self._skipped = 0
                return False
            return True
        if larger:
            return False  # never probed with more data than was measured
        self._skipped += 1
        if self._skipped >= self.probe_every:
            self._skipped = 0
            return True
        return False

    def seed(self, infer_ns: int, input_bytes: int) -> None:
        """Start from a known execution time (a warm run measured during warm-up) of
        ``input_bytes`` of inputs."""
        self._average_ns = float(min(infer_ns, self._ceiling_ns))
        self._largest_bytes = max(self._largest_bytes, input_bytes)
        self._skipped = 0

    def observe(self, infer_ns: int, inline: bool, input_bytes: int) -> None:
        """Account for one execution; only the first threaded one and inline ones count.

        Later samples are clipped at twice the threshold or twice the average, whichever is
        more, and weigh 5%: on a busy machine a run is now and then preempted, and one such
        run must not send a small model to its thread. A model that is really slow crosses
        the threshold within about 14 runs, and the largest hand-off allowance within about
        35. The first sample (and a warm-up's seed) is clipped only above that allowance, so
        a slow model is never taken for one that fits it.
        """
        if self._average_ns is None:
            self._average_ns = float(min(infer_ns, self._ceiling_ns))
        elif inline:
            sample = min(infer_ns, 2 * max(self.threshold_ns, self._average_ns))
            self._average_ns += (sample - self._average_ns) * 0.05
        else:
            return
        self._largest_bytes = max(self._largest_bytes, input_bytes)

    def observe_handoff(self, extra_ns: int) -> None:
        """Account for one execution on the thread: ``extra_ns`` is how much longer it took,
        seen from the event loop, than its own run (the hand-off there and back, and the
        waits for the GIL on the way). Samples weigh 10%."""
        sample = float(min(max(extra_ns, 0), HANDOFF_FACTOR * self.threshold_ns))
        if self._handoff_ns is None:
            self._handoff_ns = sample
        else:
            self._handoff_ns += (sample - self._handoff_ns) * 0.1


class ExecutionTimeout(Exception):
    """An execution outlived the model's ``execution_timeout_us``: its requests fail and the
    instance, whose thread may never come back, is replaced."""


class Instance:
    """One engine bound to one thread; used by one execution at a time.

    With ``timeout_s`` an execution that has not ended by then fails with
    :class:`ExecutionTimeout`; the engine is asked to stop (:meth:`Engine.cancel`) and the
    instance counts as hung: closing it then does not wait for its thread, and its engine is
    released whenever the execution does end."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        placement: Placement,
        policy: InlinePolicy | None = None,
        timeout_s: float = 0.0,
    ) -> None:
        self.name = name
        self.placement = placement
        self.policy = policy or InlinePolicy("never")
        self.timeout_s = timeout_s
        self.hung = False
        self.warmup_seconds = 0.0
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._running: concurrent.futures.Future[Execution] | None = None
        # Start the thread now: ThreadPoolExecutor creates it on first use, which would be
        # the first request's cost.
        self._executor.submit(int).result()

    def _run(
        self,
        prepare: PrepareInputs,
        output_names: Sequence[str],
        finish: FinishOutputs,
        inline: bool = False,
        input_bytes: int = 0,
    ) -> Execution:
        clock = time.perf_counter_ns
        t0 = clock()
        inputs = prepare()
        t1 = clock()
        outputs = self._engine.execute(inputs, output_names)
        t2 = clock()
        outputs = finish(outputs)
        t3 = clock()
        self.policy.observe(t2 - t1, inline, input_bytes)
        return Execution(outputs, t1 - t0, t2 - t1, t3 - t2)

    @property
    def reads_regions(self) -> bool:
        """Whether the engine's gather reads shared-memory inputs into place itself."""
        return self._engine.reads_regions

    @property
    def writes_host_outputs(self) -> bool:
        """Whether the engine may write outputs into mapped regions itself."""
        return self._engine.writes_host_outputs

    def gather(
        self, parts: dict[str, list[Tensor]], output_targets: OutputTargets | None = None
    ) -> dict[str, np.ndarray]:
        """The engine's inputs for several requests' parts (call on the instance thread),
        and where it may write their outputs itself (on a device, or in a mapped region)."""
        return self._engine.gather(parts, output_targets)

    def execute_sync(
        self,
        prepare: PrepareInputs,
        output_names: Sequence[str],
        finish: FinishOutputs,
        input_bytes: int = 0,
    ) -> Execution:
        """Run on the calling thread (small models, warm-up); the run is measured, as one
        of ``input_bytes`` of inputs (what the caller already counted for the policy)."""
        return self._run(prepare, output_names, finish, True, input_bytes)

    def execute(
        self,
        prepare: PrepareInputs,
        output_names: Sequence[str],
        finish: FinishOutputs,
        input_bytes: int = 0,
    ) -> asyncio.Future[Execution]:
        """Run on the instance thread, or launch from this one where the engine can; the
        future resolves on the caller's event loop."""
        loop = asyncio.get_running_loop()
        if self._engine.launches:
            future = self._launch(loop, prepare, output_names, finish, input_bytes)
        else:
            future = self._in_thread(prepare, output_names, finish, input_bytes)
        return self._bounded(loop, future) if self.timeout_s else future

    def _in_thread(
        self,
        prepare: PrepareInputs,
        output_names: Sequence[str],
        finish: FinishOutputs,
        input_bytes: int,
    ) -> asyncio.Future[Execution]:
        started = time.perf_counter_ns()
        self._running = self._executor.submit(
            self._run, prepare, output_names, finish, False, input_bytes
        )
        future = asyncio.wrap_future(self._running)
        future.add_done_callback(partial(self._handed_back, started))
        return future

    def _handed_back(self, started: int, future: asyncio.Future[Execution]) -> None:
        """Tell the policy what the hand-off added to an execution on the thread: the time
        from submitting it to the event loop seeing its result, less the run's own."""
        if future.cancelled() or future.exception() is not None:
            return
        run = future.result()
        spent = time.perf_counter_ns() - started
        self.policy.observe_handoff(spent - run.input_ns - run.infer_ns - run.output_ns)

    def _bounded(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Execution]
    ) -> asyncio.Future[Execution]:
        """``future``, or ExecutionTimeout once the timeout has passed without it."""
        bounded: asyncio.Future[Execution] = loop.create_future()

        def expire() -> None:
            if bounded.done():
                return
            self.hung = True
            try:
                self._engine.cancel()
            except Exception:
                log.exception("instance %s: cancelling the hung execution failed", self.name)
            bounded.set_exception(
                ExecutionTimeout(
                    f"execution on instance {self.name} took longer than "
                    f"{self.timeout_s * 1000:.0f} ms (execution_timeout_us); the instance "
                    "is replaced"
                )
            )

        timer = loop.call_later(self.timeout_s, expire)

        def settle(done: asyncio.Future[Execution]) -> None:
            timer.cancel()
            if bounded.done():
                if not done.cancelled():
                    done.exception()  # retrieved: a late failure is not worth a warning
                return
            if done.cancelled():
                bounded.cancel()
            elif (exc := done.exception()) is not None:
                bounded.set_exception(exc)
            else:
                bounded.set_result(done.result())

        future.add_done_callback(settle)
        return bounded

    def _launch(
        self,
        loop: asyncio.AbstractEventLoop,
        prepare: PrepareInputs,
        output_names: Sequence[str],
        finish: FinishOutputs,
        input_bytes: int,
    ) -> asyncio.Future[Execution]:
        clock = time.perf_counter_ns
        future: asyncio.Future[Execution] = loop.create_future()
        t0 = clock()
        try:
            inputs = prepare()
            t1 = clock()
            launched = self._engine.launch(inputs, output_names)
        except BaseException as exc:
            future.set_exception(exc)
            return future
        if launched is None:  # a shape no launch covers: the thread runs it as usual
            return self._in_thread(lambda: inputs, output_names, finish, input_bytes)
        _LaunchWatch(loop, launched, finish, future, t0, t1).check()
        return future

    def close(self) -> None:
        """Finish the running execution, then release the engine; a hung instance is not
        waited for: its engine goes when its execution ends, if ever."""
        if self.hung and self._running is not None and not self._running.done():
            self._executor.shutdown(wait=False, cancel_futures=True)
            engine = self._engine
            self._running.add_done_callback(lambda _: engine.close())
            return
        self._executor.shutdown(wait=True)
        self._engine.close()


class _LaunchWatch:
    """Resolves a launched execution's future once the device is done. With a waker, the
    loop watches its descriptor; without one, it sleeps until shortly before the engine
    expects the end, then checks at every turn (a busy loop turns often, so the check costs
    little there; an idle one spins for a moment)."""

    __slots__ = ("_finish", "_future", "_launched", "_loop", "_polling", "_t0", "_t1")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        launched: Launched,
        finish: FinishOutputs,
        future: asyncio.Future[Execution],
        t0: int,
        t1: int,
    ) -> None:
        self._loop = loop
        self._launched = launched
        self._finish = finish
        self._future = future
        self._t0 = t0
        self._t1 = t1
        self._polling = launched.waker is None

    def check(self) -> None:
        launched = self._launched
        try:
            if not launched.done():
                if not self._polling:
                    assert launched.waker is not None
                    self._loop.add_reader(launched.waker.fileno(), self._woken)
                    return
                sleep = launched.expected_at - EARLY_S - time.perf_counter()
                if sleep > 0:
                    self._loop.call_later(sleep, self.check)
                else:
                    self._loop.call_soon(self.check)
                return
            t2 = time.perf_counter_ns()
            outputs = self._finish(launched.outputs())
            t3 = time.perf_counter_ns()
        except BaseException as exc:
            if not self._future.done():
                self._future.set_exception(exc)
            return
        if not self._future.done():
            self._future.set_result(Execution(outputs, self._t1 - self._t0, t2 - self._t1, t3 - t2))

    def _woken(self) -> None:
        waker = self._launched.waker
        assert waker is not None
        try:
            waker.drain()
        except OSError:
            log.exception("an execution's wake-up could not be read; polling instead")
        else:
            if waker.received < self._launched.ticket:
                return  # an earlier launch's late wake-up
        self._loop.remove_reader(waker.fileno())
        # Signalled but not done would be a waker fault: fall back to polling, never hang.
        self._polling = True
        self.check()
