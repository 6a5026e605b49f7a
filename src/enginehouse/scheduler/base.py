"""The interface between a model version and its instances, as Triton's core draws it.

A model version checks a request and hands the :class:`Work` to its :class:`Scheduler`;
the scheduler decides when and on which instance it runs (alone, or merged into a batch),
measures it, and answers with the response. Two implementations: the default scheduler
(``scheduler/default.py``) and the dynamic batcher (``scheduler/dynamic.py``). What every
scheduler shares lives here: admission against the pending limits, the in-flight counts
that unload and metrics read, failure accounting and draining.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from enginehouse.config.tensors import TensorSpec
from enginehouse.errors import EnginehouseError, InternalError, UnavailableError
from enginehouse.messages import (
    InferRequest,
    InferResponse,
    OutputTargets,
    OutputTensor,
    RegionTensor,
    Tensor,
)
from enginehouse.runtime.instance import FinishOutputs, Instance
from enginehouse.scheduler.instances import InstanceSupervisor
from enginehouse.scheduler.statistics import ModelStatistics


@dataclass(frozen=True, slots=True)
class PendingLimits:
    """How much one model version holds admitted and not yet answered (queued or running);
    past either bound a request gets 503 / UNAVAILABLE at once. A server-wide safety net
    under each model's own ``max_queue_size``: without it a burst is admitted without limit,
    its latency grows past every client deadline and its tensors fill the memory."""

    max_requests: int = 2048
    max_bytes: int = 1 << 30


@dataclass(slots=True)
class Work:
    """A checked request as a scheduler takes it: the engine feeds, the outputs to return,
    its batch size, when it arrived (perf_counter_ns), its input bytes, and whether an
    input still waits in a shared-memory region (to be read by the engine's gather)."""

    request: InferRequest
    feeds: dict[str, Tensor]
    names: tuple[str, ...]
    batch_size: int
    start_ns: int
    nbytes: int
    in_regions: bool = False

    def inputs(self, instance: Instance) -> Callable[[], dict[str, np.ndarray]]:
        """What an execution of this request alone takes as its inputs: the feeds, or,
        where some wait in a region or an output may be written in place, the instance's
        gather of them (read into place)."""
        feeds = self.feeds
        if self.in_regions or self.request.output_targets is not None:
            output_targets = output_targets_of([self])
            return lambda: instance.gather({name: [a] for name, a in feeds.items()}, output_targets)
        arrays = cast(dict[str, np.ndarray], feeds)  # no RegionTensor among them
        return lambda: arrays


def output_targets_of(works: Sequence[Work]) -> OutputTargets | None:
    """Where a batch's requests' outputs may be written in place, in the batch's order;
    None when no request has such a target (almost always)."""
    if all(work.request.output_targets is None for work in works):
        return None
    names = {name for work in works for name in work.request.output_targets or ()}
    return {
        name: [(work.request.output_targets or {}).get(name) for work in works] for name in names
    }


def _unchanged(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return outputs


class Responses:
    """How the outputs of an execution become a version's responses: the outputs'
    datatypes, and the reshape back to client dims where the config asks for one."""

    def __init__(
        self, model: str, version: str, outputs: Mapping[str, TensorSpec], batching: bool
    ) -> None:
        self.model = model
        self.version = version
        self.datatypes = {name: spec.datatype for name, spec in outputs.items()}
        self._reshaped = {
            name: spec.dims for name, spec in outputs.items() if spec.reshape is not None
        }
        self.batching = batching

    def finisher(self, names: Sequence[str], batch_size: int) -> FinishOutputs:
        """What turns the engine's outputs into the client's shapes: nothing to do unless an
        output has a ``reshape`` (decided once at load)."""
        if not self._reshaped:
            return _unchanged
        shapes = [self._reshaped.get(n) for n in names]
        batching = self.batching

        def finish(results: list[np.ndarray]) -> list[np.ndarray]:
            finished = []
            for dims, result in zip(shapes, results):
                array = np.asarray(result)
                if dims is not None:
                    array = array.reshape((batch_size, *dims) if batching else dims)
                finished.append(array)
            return finished

        return finish

    def response(
        self, request: InferRequest, names: Sequence[str], arrays: Sequence[np.ndarray]
    ) -> InferResponse:
        datatypes = self.datatypes
        outputs = [
            OutputTensor(name, datatypes[name], array.shape, array)
            for name, array in zip(names, arrays)
        ]
        return InferResponse(self.model, self.version, request.id, outputs)


class Scheduler(ABC):
    """Runs a model version's checked requests on its instances.

    ``in_flight`` counts requests admitted and not yet answered, queued or running (unload
    waits for it to reach zero); ``pending_bytes`` their input bytes; :attr:`queued` those
    still waiting for an instance. The statistics are the version's: every figure in them
    is measured here."""

    def __init__(
        self, responses: Responses, instances: InstanceSupervisor, limits: PendingLimits
    ) -> None:
        self.responses = responses
        self.instances = instances
        self.limits = limits
        self.statistics = ModelStatistics(responses.model, responses.version)
        self.in_flight = 0
        self.pending_bytes = 0
        # Whether the instances read inputs left in shared-memory regions into place as they
        # gather a batch (GPU instances' staging), so that requests may carry them so. Known
        # once, at load: replacements come from the same factory.
        loaded = instances.all()
        self.reads_regions = bool(loaded) and all(i.reads_regions for i in loaded)
        # Whether they may write outputs into mapped regions themselves (likewise once).
        self.writes_host_outputs = bool(loaded) and all(i.writes_host_outputs for i in loaded)

    @abstractmethod
    def submit(self, work: Work) -> InferResponse | Awaitable[InferResponse]:
        """The response at once where the work ran inline on this thread, else an
        awaitable of it; 503 / UNAVAILABLE at once when the version holds too much."""

    @property
    @abstractmethod
    def queued(self) -> int:
        """Requests waiting for an instance."""

    @abstractmethod
    async def close(self) -> None:
        """Fail what is queued, let running executions finish, stop background work."""

    def admit(self, work: Work) -> None:
        """Refuse work past the pending limits; otherwise read inputs left in regions where
        the instances will not, and note when it was admitted (queue time counts from here)."""
        limits = self.limits
        if (
            self.in_flight >= limits.max_requests
            or self.pending_bytes + work.nbytes > limits.max_bytes
        ):
            self.statistics.record_failure(time.perf_counter_ns() - work.start_ns)
            raise UnavailableError(
                f"model '{self.responses.model}' has {self.in_flight} requests "
                f"({self.pending_bytes} bytes) pending, the most this server holds per model "
                f"({limits.max_requests} requests, {limits.max_bytes} bytes); retry later"
            )
        if work.in_regions and not self.reads_regions:
            # Read now, on the event loop, while the instances run other requests.
            try:
                work.feeds = {
                    name: tensor.array() if isinstance(tensor, RegionTensor) else tensor
                    for name, tensor in work.feeds.items()
                }
            except EnginehouseError:
                self.statistics.record_failure(time.perf_counter_ns() - work.start_ns)
                raise
            work.in_regions = False
        work.request.admitted_ns = time.perf_counter_ns()

    def pending(self, work: Work) -> None:
        """Count admitted work that will be answered later, until :meth:`settled`. Counted
        from admission, not from when a coroutine first runs: an unload that comes in
        between must wait for this request, not shut its instance down. (Work answered
        inline, before control returns to the event loop, is never seen pending.)"""
        self.in_flight += 1
        self.pending_bytes += work.nbytes

    def settled(self, work: Work) -> None:
        self.in_flight -= 1
        self.pending_bytes -= work.nbytes

    async def drain(self) -> None:
        """Until every admitted request has been answered."""
        while self.in_flight:
            await asyncio.sleep(0.005)

    def failed(
        self, instance: Instance, exc: BaseException, starts: Sequence[int]
    ) -> BaseException:
        """Account for an execution that raised: the instance goes back or is replaced,
        each request counts as failed; returns the error to raise."""
        now = time.perf_counter_ns()
        for start in starts:
            self.statistics.record_failure(now - start)
        self.instances.release_after(instance, exc)
        if isinstance(exc, EnginehouseError | asyncio.CancelledError):
            return exc
        responses = self.responses
        return InternalError(f"model '{responses.model}' version {responses.version} failed: {exc}")
