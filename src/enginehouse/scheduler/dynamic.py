"""The dynamic batcher as a scheduler: merging requests, executing, splitting back.

Requests join a batch only when every input has the same non-batch shape (and the same
optional inputs are present); their inputs are concatenated along the batch dimension on
the instance thread, the union of their requested outputs is computed once, and each
request gets its slice. With ``preserve_ordering`` responses are released in arrival order
even when several instances finish out of order. When batches form is the batcher's
business (``scheduler/batcher.py``), which batch is next the queue's (``scheduler/queue.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enginehouse.errors import EnginehouseError, InternalError, InvalidArgumentError
from enginehouse.messages import InferResponse
from enginehouse.runtime.instance import Execution, Instance
from enginehouse.scheduler.base import (
    PendingLimits,
    Responses,
    Scheduler,
    Work,
    output_targets_of,
)
from enginehouse.scheduler.batcher import DynamicBatcher
from enginehouse.scheduler.instances import InstanceSupervisor
from enginehouse.scheduler.queue import BatchingPolicy, Pending


@dataclass(slots=True)
class BatchItem:
    """One request in the queue: its work, and the future to resolve."""

    work: Work
    future: asyncio.Future[InferResponse]
    sequence: int = 0
    result: InferResponse | BaseException | None = field(default=None)


def _int_parameter(parameters: dict[str, Any], key: str) -> int:
    value = parameters.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"request parameter '{key}' must be a non-negative integer")
    return value


class DynamicBatchScheduler(Scheduler):
    """Owns the batcher of a version and the merge/split around each execution."""

    def __init__(
        self,
        responses: Responses,
        instances: InstanceSupervisor,
        limits: PendingLimits,
        policy: BatchingPolicy,
    ) -> None:
        super().__init__(responses, instances, limits)
        self.policy = policy
        self.batcher: DynamicBatcher[BatchItem] = DynamicBatcher(
            f"{responses.model}:{responses.version}", policy, instances, self._run, self._fail
        )
        self._next_sequence = 0
        self._next_release = 0
        self._finished: dict[int, BatchItem] = {}

    @property
    def queued(self) -> int:
        return self.batcher.queue.size

    def submit(self, work: Work) -> asyncio.Future[InferResponse]:
        """Queue a checked request; the future resolves when its batch has run.

        A plain future rather than a coroutine: at thousands of requests a second, a task and
        its coroutine frames per request are a measurable share of the core's CPU."""
        parameters = work.request.parameters
        priority = _int_parameter(parameters, "priority") if parameters else 0
        timeout_us = _int_parameter(parameters, "timeout") if parameters else 0
        self.admit(work)
        self.pending(work)
        feeds = work.feeds
        shape_key: Hashable = tuple(sorted((n, a.shape[1:]) for n, a in feeds.items()))
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        item = BatchItem(work, future, self._next_sequence)
        try:
            self.batcher.submit(
                item, work.batch_size, shape_key, work.start_ns, priority, timeout_us
            )
        except BaseException:
            self.settled(work)
            raise
        self._next_sequence += 1
        return future

    def _fail(self, pending: Pending[BatchItem], error: EnginehouseError) -> None:
        item = pending.item
        self.statistics.record_failure(time.perf_counter_ns() - item.work.start_ns)
        self._settle(item, error)

    def _settle(self, item: BatchItem, result: InferResponse | BaseException) -> None:
        self.settled(item.work)
        if not self.policy.preserve_ordering:
            _resolve(item.future, result)
            return
        item.result = result
        self._finished[item.sequence] = item
        while self._next_release in self._finished:
            ready = self._finished.pop(self._next_release)
            assert ready.result is not None
            _resolve(ready.future, ready.result)
            self._next_release += 1

    async def _run(self, instance: Instance, batch: list[Pending[BatchItem]]) -> None:
        items = [p.item for p in batch]
        works = [item.work for item in items]
        sizes = [p.batch_size for p in batch]
        total = sum(sizes)
        names = tuple(dict.fromkeys(n for work in works for n in work.names))
        queued = time.perf_counter_ns()

        output_targets = output_targets_of(works)

        def prepare() -> dict[str, np.ndarray]:
            return instance.gather(
                {name: [work.feeds[name] for work in works] for name in works[0].feeds},
                output_targets,
            )

        finish = self.responses.finisher(names, total)
        input_bytes = sum(work.nbytes for work in works)
        try:
            if instance.policy.inline(input_bytes):
                execution = instance.execute_sync(prepare, names, finish, input_bytes)
            else:
                execution = await asyncio.shield(
                    instance.execute(prepare, names, finish, input_bytes)
                )
            short = execution.short_output(names, total)
            if short is not None:
                # The model's fault, not the instance's (an EnginehouseError: it stays).
                responses = self.responses
                raise InternalError(
                    f"model '{responses.model}' version {responses.version}: {short}"
                )
        except BaseException as exc:
            error = self.failed(instance, exc, [work.start_ns for work in works])
            for item in items:
                self._settle(item, error)
            return
        self.instances.release(instance)
        self._split(items, sizes, names, execution, queued)

    def _split(
        self,
        items: list[BatchItem],
        sizes: list[int],
        names: tuple[str, ...],
        execution: Execution,
        queued: int,
    ) -> None:
        statistics = self.statistics
        statistics.record_execution(
            sum(sizes), execution.input_ns, execution.infer_ns, execution.output_ns
        )
        respond = self.responses.response
        results = execution.outputs
        columns = {name: results[i] for i, name in enumerate(names)}
        offset = 0
        now = time.perf_counter_ns()
        totals: list[int] = []
        queues: list[int] = []
        answers: list[InferResponse] = []
        for item, size in zip(items, sizes):
            work = item.work
            end = offset + size
            rows = [columns[name][offset:end] for name in work.names]
            answers.append(respond(work.request, work.names, rows))
            offset = end
            totals.append(now - work.start_ns)
            queues.append(queued - work.request.admitted_ns)
        statistics.record_successes(
            totals, queues, execution.input_ns, execution.infer_ns, execution.output_ns
        )
        for item, response in zip(items, answers):
            self._settle(item, response)

    async def close(self) -> None:
        await self.batcher.close()
        self.instances.stop_background()


def _resolve(future: asyncio.Future[InferResponse], result: InferResponse | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
