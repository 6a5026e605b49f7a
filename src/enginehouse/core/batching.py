"""Dynamic batching of one model version: merging requests, executing, splitting back.

Requests join a batch only when every input has the same non-batch shape (and the same
optional inputs are present); their inputs are concatenated along the batch dimension on
the instance thread, the union of their requested outputs is computed once, and each
request gets its slice. With ``preserve_ordering`` responses are released in arrival order
even when several instances finish out of order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from enginehouse.core.types import InferRequest, InferResponse, OutputTensor
from enginehouse.errors import EnginehouseError, InternalError, InvalidArgumentError
from enginehouse.runtime.instance import Execution, Instance
from enginehouse.scheduler.batcher import DynamicBatcher
from enginehouse.scheduler.queue import BatchingPolicy, Pending

if TYPE_CHECKING:
    from enginehouse.core.model import ModelVersion


@dataclass(slots=True)
class BatchItem:
    """One request in the queue: its checked inputs, outputs, and the future to resolve."""

    request: InferRequest
    feeds: dict[str, np.ndarray]
    names: tuple[str, ...]
    start_ns: int
    future: asyncio.Future[InferResponse]
    sequence: int = 0
    nbytes: int = 0
    result: InferResponse | BaseException | None = field(default=None)


def _int_parameter(parameters: dict[str, Any], key: str) -> int:
    value = parameters.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"request parameter '{key}' must be a non-negative integer")
    return value


class BatchedExecution:
    """Owns the batcher of a version and the merge/split around each execution."""

    def __init__(self, version: ModelVersion, policy: BatchingPolicy) -> None:
        self.version = version
        self.policy = policy
        self.batcher: DynamicBatcher[BatchItem] = DynamicBatcher(
            f"{version.name}:{version.version}", policy, version.pool, self._run, self._fail
        )
        self._next_sequence = 0
        self._next_release = 0
        self._finished: dict[int, BatchItem] = {}

    def enqueue(
        self,
        request: InferRequest,
        feeds: dict[str, np.ndarray],
        batch_size: int,
        names: tuple[str, ...],
        start: int,
        input_bytes: int = 0,
    ) -> asyncio.Future[InferResponse]:
        """Queue a checked request; the future resolves when its batch has run.

        A plain future rather than a coroutine: at thousands of requests a second, a task and
        its coroutine frames per request are a measurable share of the core's CPU. The
        version counts the request as in flight until it is settled."""
        parameters = request.parameters
        priority = _int_parameter(parameters, "priority") if parameters else 0
        timeout_us = _int_parameter(parameters, "timeout") if parameters else 0
        shape_key: Hashable = tuple(sorted((n, a.shape[1:]) for n, a in feeds.items()))
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        item = BatchItem(request, feeds, names, start, future, self._next_sequence, input_bytes)
        self.batcher.submit(item, batch_size, shape_key, start, priority, timeout_us)
        self._next_sequence += 1
        self.version.in_flight += 1
        self.version.pending_bytes += input_bytes
        return future

    def _fail(self, pending: Pending[BatchItem], error: EnginehouseError) -> None:
        self.version.statistics.record_failure(time.perf_counter_ns() - pending.item.start_ns)
        self._settle(pending.item, error)

    def _settle(self, item: BatchItem, result: InferResponse | BaseException) -> None:
        self.version.in_flight -= 1
        self.version.pending_bytes -= item.nbytes
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
        version = self.version
        items = [p.item for p in batch]
        sizes = [p.batch_size for p in batch]
        total = sum(sizes)
        names = tuple(dict.fromkeys(n for item in items for n in item.names))
        queued = time.perf_counter_ns()

        def prepare() -> dict[str, np.ndarray]:
            return instance.gather(
                {name: [item.feeds[name] for item in items] for name in items[0].feeds}
            )

        finish = version.finisher(names, total)
        input_bytes = sum(a.nbytes for item in items for a in item.feeds.values())
        try:
            if instance.policy.inline(input_bytes):
                execution = instance.execute_sync(prepare, names, finish)
            else:
                execution = await asyncio.shield(instance.execute(prepare, names, finish))
            short = execution.short_output(names, total)
            if short is not None:
                # The model's fault, not the instance's (an EnginehouseError: it stays).
                raise InternalError(f"model '{version.name}' version {version.version}: {short}")
        except BaseException as exc:
            error = version.execution_failed(instance, exc, [item.start_ns for item in items])
            for item in items:
                self._settle(item, error)
            return
        version.pool.release(instance)
        self._split(items, sizes, names, execution, queued)

    def _split(
        self,
        items: list[BatchItem],
        sizes: list[int],
        names: tuple[str, ...],
        execution: Execution,
        queued: int,
    ) -> None:
        version = self.version
        version.statistics.record_execution(
            sum(sizes), execution.input_ns, execution.infer_ns, execution.output_ns
        )
        specs = version.outputs
        results = execution.outputs
        columns = {name: (specs[name].datatype, results[i]) for i, name in enumerate(names)}
        offset = 0
        now = time.perf_counter_ns()
        totals: list[int] = []
        queues: list[int] = []
        responses: list[InferResponse] = []
        for item, size in zip(items, sizes):
            end = offset + size
            outputs = []
            for name in item.names:
                datatype, whole = columns[name]
                array = whole[offset:end]
                outputs.append(OutputTensor(name, datatype, array.shape, array))
            offset = end
            totals.append(now - item.start_ns)
            queues.append(queued - item.request.admitted_ns)
            responses.append(InferResponse(version.name, version.version, item.request.id, outputs))
        version.statistics.record_successes(
            totals, queues, execution.input_ns, execution.infer_ns, execution.output_ns
        )
        for item, response in zip(items, responses):
            self._settle(item, response)

    async def close(self) -> None:
        await self.batcher.close()


def _resolve(future: asyncio.Future[InferResponse], result: InferResponse | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
