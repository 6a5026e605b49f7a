"""Triton's default scheduler: each request executes alone, on the next free instance.

A request that finds a free instance whose policy says "inline" runs at once on the event
loop's thread and is answered without a task switch; otherwise it waits for an instance in
the pool (a future, never a blocked thread) and runs on that instance's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from enginehouse.messages import InferResponse
from enginehouse.runtime.instance import Execution, Instance
from enginehouse.scheduler.base import Scheduler, Work


class DefaultScheduler(Scheduler):
    """Requests run one by one, each on the first instance that is free."""

    @property
    def queued(self) -> int:
        return self.instances.pool.waiting

    def submit(self, work: Work) -> InferResponse | Awaitable[InferResponse]:
        self.admit(work)
        instance = self.instances.try_acquire()
        if instance is None or not instance.policy.inline(work.nbytes):
            self.pending(work)
            return self._run_async(work, instance)
        return self._run_inline(work, instance)

    def _run_inline(self, work: Work, instance: Instance) -> InferResponse:
        """Execute on this thread with an instance already taken from the pool."""
        queued = time.perf_counter_ns()
        names = work.names
        try:
            execution = instance.execute_sync(
                work.inputs(instance),
                names,
                self.responses.finisher(names, work.batch_size),
                work.nbytes,
            )
        except BaseException as exc:
            raise self.failed(instance, exc, (work.start_ns,)) from exc
        self.instances.release(instance)
        return self._respond(work, execution, queued)

    async def _run_async(self, work: Work, instance: Instance | None) -> InferResponse:
        """Wait for an instance where none was free, run there; counted in ``in_flight``
        from admission, uncounted here once settled."""
        instances = self.instances
        try:
            if instance is None:
                try:
                    instance = await instances.acquire()
                except BaseException:
                    self.statistics.record_failure(time.perf_counter_ns() - work.start_ns)
                    raise
            if instance.policy.inline(work.nbytes):
                return self._run_inline(work, instance)
            queued = time.perf_counter_ns()
            names = work.names
            future = instance.execute(
                work.inputs(instance),
                names,
                self.responses.finisher(names, work.batch_size),
                work.nbytes,
            )
            try:
                # Shielded: a cancelled request must not free an instance still executing.
                execution = await asyncio.shield(future)
            except asyncio.CancelledError:
                taken = instance
                future.add_done_callback(lambda _: instances.release(taken))
                self.statistics.record_failure(time.perf_counter_ns() - work.start_ns)
                raise
            except BaseException as exc:
                raise self.failed(instance, exc, (work.start_ns,)) from exc
            instances.release(instance)
            return self._respond(work, execution, queued)
        finally:
            self.settled(work)

    def _respond(self, work: Work, execution: Execution, queued: int) -> InferResponse:
        stats = self.statistics
        stats.record_execution(
            work.batch_size if self.responses.batching else 1,
            execution.input_ns,
            execution.infer_ns,
            execution.output_ns,
        )
        stats.record_success(
            time.perf_counter_ns() - work.start_ns,
            queued - work.request.admitted_ns,
            execution.input_ns,
            execution.infer_ns,
            execution.output_ns,
        )
        return self.responses.response(work.request, work.names, execution.outputs)

    async def close(self) -> None:
        self.instances.stop_background()
