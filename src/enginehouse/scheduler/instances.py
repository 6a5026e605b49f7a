"""The one owner of a model version's instances: who hands them out, who replaces them.

Both schedulers take instances from here and give them back here. An instance whose
backend raised or hung is taken out of service and a fresh one is loaded in the background;
idle instances are health-checked now and then; unload closes them all. Metrics read the
counts kept here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import numpy as np

from enginehouse.errors import EnginehouseError
from enginehouse.runtime.instance import Instance, InstanceFactory
from enginehouse.scheduler.pool import InstancePool

log = logging.getLogger(__name__)


class InstanceSupervisor:
    """The instances of one model version: the pool that hands them out, and their health."""

    def __init__(
        self,
        label: str,
        instances: Sequence[Instance],
        factory: InstanceFactory | None = None,
    ) -> None:
        # How log lines name the version ("model 'm' version 1").
        self.label = label
        self.pool = InstancePool(instances)
        self.factory = factory
        self.failed = 0
        self.replacements = 0
        self.health_checks = 0
        self.warming = 0
        self._background: set[asyncio.Task[None]] = set()

    def all(self) -> list[Instance]:
        """Every instance in service, idle or busy."""
        return self.pool.all()

    def try_acquire(self) -> Instance | None:
        return self.pool.try_acquire()

    async def acquire(self) -> Instance:
        return await self.pool.acquire()

    def release(self, instance: Instance) -> None:
        self.pool.release(instance)

    def release_after(self, instance: Instance, exc: BaseException) -> None:
        """Take back an instance whose execution raised: a request's own fault (or its
        cancellation) leaves the instance serving; a backend that failed or hung has it
        replaced, and never handed to a waiting request first."""
        if isinstance(exc, EnginehouseError | asyncio.CancelledError):
            self.pool.release(instance)
        else:
            self.replace(instance, exc)

    def replace(self, instance: Instance, cause: BaseException) -> None:
        """Take a failed instance out of service and load a fresh one in the background."""
        log.error("%s: instance %s failed (%s); replacing it", self.label, instance.name, cause)
        self.pool.remove(instance)
        self.failed += 1
        if self.factory is None:
            return
        factory = self.factory

        async def replace() -> None:
            await asyncio.to_thread(instance.close)
            self.warming += 1
            try:
                fresh = await asyncio.to_thread(factory, instance.name, instance.placement)
            except Exception:
                log.exception("%s: cannot replace instance %s", self.label, instance.name)
                return
            finally:
                self.warming -= 1
            self.replacements += 1
            self.pool.add(fresh)
            log.info("%s: instance %s replaced and warm", self.label, fresh.name)

        self._spawn(replace())

    def start_health_checks(
        self, interval_s: float, inputs: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> None:
        """Every ``interval_s``, run ``inputs`` (engine shapes) on each idle instance; one
        that fails is replaced. Busy instances are skipped: traffic proves them."""
        if interval_s > 0 and inputs:
            self._spawn(self._health_loop(interval_s, dict(inputs), list(names)))

    async def _health_loop(
        self, interval_s: float, inputs: dict[str, np.ndarray], names: list[str]
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for _ in range(len(self.pool.all())):
                instance = self.pool.try_acquire()
                if instance is None:
                    break
                try:
                    await asyncio.shield(instance.execute(lambda: inputs, names, list))
                except Exception as exc:
                    self.replace(instance, exc)
                    continue
                self.health_checks += 1
                self.pool.release(instance)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stop_background(self) -> None:
        """Stop health checks and replacements still loading (unload)."""
        for task in list(self._background):
            task.cancel()

    def close(self) -> None:
        """Close every instance; none may be executing."""
        for instance in self.pool.all():
            instance.close()
