"""The dynamic batcher's loop: waits for a free instance, asks the queue for a batch, runs it.

Batches are formed only when an instance is free, so while every instance is busy requests
gather into larger batches. The queue's decisions (:mod:`enginehouse.scheduler.queue`) are
pure; this module owns the waiting: for arrivals, for the queue delay to pass, for a free
instance, and for request deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from enginehouse.errors import EnginehouseError, UnavailableError
from enginehouse.runtime.instance import Instance
from enginehouse.scheduler.instances import InstanceSupervisor
from enginehouse.scheduler.queue import BatchingPolicy, BatchQueue, Pending

log = logging.getLogger(__name__)

T = TypeVar("T")

RunBatch = Callable[[Instance, list[Pending[T]]], Coroutine[Any, Any, None]]
FailItem = Callable[[Pending[T], EnginehouseError], None]


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class DynamicBatcher(Generic[T]):
    """One model version's queue and the task that turns it into executions."""

    def __init__(
        self,
        name: str,
        policy: BatchingPolicy,
        pool: InstanceSupervisor,
        run_batch: RunBatch[T],
        fail: FailItem[T],
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.name = name
        self.queue: BatchQueue[T] = BatchQueue(policy)
        self._pool = pool
        self._run_batch = run_batch
        self._fail = fail
        self._clock = clock
        # What the loop awaits while it waits for an arrival (or for the queue delay to
        # pass): a bare future that submit() resolves. An asyncio.Event awaited through
        # wait_for() cost a task and a timeout context per wait, a batch's worth of work
        # for the event loop at a few thousand batches a second.
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def submit(
        self,
        item: T,
        batch_size: int,
        shape_key: Hashable,
        arrival_ns: int,
        priority: int = 0,
        timeout_us: int = 0,
    ) -> None:
        """Queue a request (UnavailableError when its level is full)."""
        self.queue.admit(item, batch_size, shape_key, arrival_ns, priority, timeout_us)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _resolve(waiter)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def executing(self) -> int:
        return len(self._running)

    async def _loop(self) -> None:
        queue = self.queue
        while True:
            if not queue.size:
                await self._arrival(None)
            instance = self._pool.try_acquire()
            if instance is None:
                instance = await self._acquire_or_expire()
                if instance is None:
                    continue
            while True:
                decision = queue.next(self._clock())
                for pending in decision.expired:
                    self._fail(pending, UnavailableError("request timed out in the queue"))
                if decision.batch:
                    task: asyncio.Task[None] = asyncio.ensure_future(
                        self._run_batch(instance, decision.batch)
                    )
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                    break
                if not queue.size:
                    self._pool.release(instance)
                    break
                await self._arrival(max(0.0, (decision.wake_at_ns - self._clock()) / 1e9))

    async def _arrival(self, delay_s: float | None) -> None:
        """Until the next request arrives, or ``delay_s`` has passed (None: no limit)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = None if delay_s is None else loop.call_later(delay_s, _resolve, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    async def _acquire_or_expire(self) -> Instance | None:
        """A free instance; meanwhile requests whose deadline passes are failed."""
        deadlines = [p.deadline_ns for p in self.queue.pending() if p.deadline_ns]
        timeout = max(0.0, (min(deadlines) - self._clock()) / 1e9) if deadlines else None
        try:
            return await asyncio.wait_for(self._pool.acquire(), timeout)
        except TimeoutError:
            for pending in self.queue.expire(self._clock()):
                self._fail(pending, UnavailableError("request timed out in the queue"))
            return None

    async def close(self) -> None:
        """Fail what is queued, wait for running batches, stop the loop."""
        for pending in self.queue.drain():
            self._fail(pending, UnavailableError(f"model '{self.name}' is unloading"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
