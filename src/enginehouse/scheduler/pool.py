"""Handing out the free instances of a model version, first come first served.

Requests that find no free instance wait here, in the scheduler, as futures on the event
loop, never as blocked threads. This is Triton's default scheduler: each request executes
alone, on the next instance that becomes free.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from enginehouse.runtime.instance import Instance


class InstancePool:
    """Free instances of one model version and the requests waiting for one."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        # A dict keeps insertion order and makes the per-release membership check O(1).
        self._members: dict[Instance, None] = dict.fromkeys(instances)
        self._idle: deque[Instance] = deque(instances)
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        # Total time requests (or the batcher) spent waiting for a free instance.
        self.wait_ns = 0

    def all(self) -> list[Instance]:
        """Every instance in service (idle or busy)."""
        return list(self._members)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        return len(self._members) - len(self._idle)

    def add(self, instance: Instance) -> None:
        """Put a new instance into service."""
        self._members[instance] = None
        self.release(instance)

    def remove(self, instance: Instance) -> None:
        """Take an instance out of service (it must not be idle-listed afterwards)."""
        self._members.pop(instance, None)
        if instance in self._idle:
            self._idle.remove(instance)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> Instance | None:
        """A free instance at once, or None (then await :meth:`acquire`)."""
        if self._idle and not self._waiters:
            return self._idle.popleft()
        return None

    async def acquire(self) -> Instance:
        """The next free instance, waiting in arrival order."""
        instance = self.try_acquire()
        if instance is not None:
            return instance
        future: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        started = time.perf_counter_ns()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise
        finally:
            self.wait_ns += time.perf_counter_ns() - started

    def release(self, instance: Instance) -> None:
        """Give an instance back: to the oldest waiter, or to the idle set."""
        if instance not in self._members:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._idle.append(instance)
