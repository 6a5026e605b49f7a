"""A loaded model version: request validation and the path of one request through it.

Everything a request is checked against is computed once at load (tensor specs, output
names); the request path does dictionary lookups and array views, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes
from enginehouse.builder.artifacts import BuiltEngine
from enginehouse.config.model_config import to_engine_shapes
from enginehouse.core.batching import BatchedExecution
from enginehouse.core.statistics import ModelStatistics
from enginehouse.core.types import (
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    OutputTensor,
    TensorMetadata,
)
from enginehouse.errors import (
    EnginehouseError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
)
from enginehouse.runtime.instance import (
    Execution,
    FinishOutputs,
    Instance,
    InstanceFactory,
)
from enginehouse.scheduler.pool import InstancePool
from enginehouse.scheduler.queue import BatchingPolicy

log = logging.getLogger(__name__)


def _unchanged(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return outputs


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A config input or output: wire datatype, client dims, and the engine's reshape."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None
    optional: bool

    @classmethod
    def from_config(cls, tensor: mc.ModelInput | mc.ModelOutput) -> TensorSpec:
        reshape = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None
        optional = bool(getattr(tensor, "optional", False))
        datatype = datatypes.BY_CONFIG[tensor.data_type].name
        return cls(tensor.name, datatype, tuple(tensor.dims), reshape, optional)


@dataclass(frozen=True, slots=True)
class PendingLimits:
    """How much one model version holds admitted and not yet answered (queued or running);
    past either bound a request gets 503 / UNAVAILABLE at once. A server-wide safety net
    under each model's own ``max_queue_size``: without it a burst is admitted without limit,
    its latency grows past every client deadline and its tensors fill the memory."""

    max_requests: int = 2048
    max_bytes: int = 1 << 30


def _shape_matches(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    if shape == dims:  # the usual case, decided in C
        return True
    if len(shape) != len(dims):
        return False
    for got, want in zip(shape, dims):
        if want != -1 and got != want:
            return False
    return True


class ModelVersion:
    """One version of a model, loaded, with its instances and statistics."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        pool: InstancePool,
        instance_factory: InstanceFactory | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = str(version)
        self.pool = pool
        self.max_batch_size = config.max_batch_size
        self.batching = config.max_batch_size > 0
        self.inputs = {t.name: TensorSpec.from_config(t) for t in config.input}
        self.outputs = {t.name: TensorSpec.from_config(t) for t in config.output}
        self.required_inputs = frozenset(n for n, s in self.inputs.items() if not s.optional)
        self.all_output_names = tuple(self.outputs)
        self._output_reshapes = any(spec.reshape is not None for spec in self.outputs.values())
        self.statistics = ModelStatistics(self.name, self.version)
        self.in_flight = 0
        # Bytes of the inputs of the requests counted in in_flight.
        self.pending_bytes = 0
        self.limits = PendingLimits()
        self.instance_factory = instance_factory
        self.replacements = 0
        # Inputs (client shapes) of a warm-up sample; the server sends a few requests through
        # the whole request path with them before the version becomes ready.
        self.warmup_inputs: dict[str, np.ndarray] = {}
        # The engine the instances loaded (the source, or a built artefact and its manifest).
        self.engine: BuiltEngine | None = None
        # What the version was loaded from (files and config); a reload keeps it when equal.
        self.identity = ""
        # Device memory one instance took when loaded, by device label (GPU instances).
        self.instance_memory: dict[str, int] = {}
        self.failed_instances = 0
        self.health_checks = 0
        self.warming_instances = 0
        self._background: set[asyncio.Task[None]] = set()
        self.batched: BatchedExecution | None = None
        if self.batching and config.HasField("dynamic_batching"):
            self.batched = BatchedExecution(self, BatchingPolicy.from_config(config))

    @property
    def queued(self) -> int:
        """Requests waiting for an instance: in the batcher's queue, or for a free instance."""
        if self.batched is not None:
            return self.batched.batcher.queue.size
        return self.pool.waiting

    def metadata(self, versions: Sequence[str]) -> ModelMetadata:
        batch = (-1,) if self.batching else ()
        return ModelMetadata(
            name=self.name,
            versions=tuple(versions),
            platform=self.config.platform or self.config.backend,
            inputs=tuple(
                TensorMetadata(s.name, s.datatype, batch + s.dims) for s in self.inputs.values()
            ),
            outputs=tuple(
                TensorMetadata(s.name, s.datatype, batch + s.dims) for s in self.outputs.values()
            ),
        )

    def _check_inputs(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        """The engine feeds and the batch size, or a 400 naming what is wrong."""
        feeds: dict[str, np.ndarray] = {}
        batch_size = 1
        model = self.name
        for item in request.inputs:
            spec = self.inputs.get(item.name)
            if spec is None:
                raise InvalidArgumentError(
                    f"unexpected inference input '{item.name}' for model '{model}', "
                    f"expected one of {sorted(self.inputs)}"
                )
            if item.name in feeds:
                raise InvalidArgumentError(
                    f"input '{item.name}' appears more than once in the request"
                )
            if item.datatype != spec.datatype:
                raise InvalidArgumentError(
                    f"inference input '{item.name}' data-type is '{item.datatype}', "
                    f"but model '{model}' expects '{spec.datatype}'"
                )
            shape = item.shape
            if self.batching:
                if not shape or not _shape_matches(shape[1:], spec.dims):
                    raise InvalidArgumentError(
                        f"unexpected shape for input '{item.name}' for model '{model}'. "
                        f"Expected [-1,{','.join(map(str, spec.dims))}], got {list(shape)}"
                    )
                if feeds:
                    if shape[0] != batch_size:
                        raise InvalidArgumentError(
                            f"input '{item.name}' has batch size {shape[0]} but other inputs "
                            f"of the request have {batch_size}"
                        )
                else:
                    batch_size = shape[0]
                    if batch_size < 1 or batch_size > self.max_batch_size:
                        raise InvalidArgumentError(
                            f"inference request batch-size must be <= {self.max_batch_size} "
                            f"for '{model}', got {batch_size} (input '{item.name}')"
                        )
            elif not _shape_matches(shape, spec.dims):
                raise InvalidArgumentError(
                    f"unexpected shape for input '{item.name}' for model '{model}'. "
                    f"Expected {list(spec.dims)}, got {list(shape)}"
                )
            data = item.data
            if data.shape != shape:
                raise InvalidArgumentError(
                    f"input '{item.name}': data holds shape {list(data.shape)}, "
                    f"the request says {list(shape)}"
                )
            if spec.reshape is not None:
                data = data.reshape((batch_size, *spec.reshape) if self.batching else spec.reshape)
            feeds[item.name] = data
        if len(feeds) < len(self.required_inputs) or not self.required_inputs.issubset(feeds):
            missing = sorted(self.required_inputs.difference(feeds))
            raise InvalidArgumentError(
                f"expected {len(self.required_inputs)} inputs but got {len(feeds)} inputs for "
                f"model '{model}'; missing required input(s) {missing}"
            )
        return feeds, batch_size

    def _output_names(self, request: InferRequest) -> tuple[str, ...]:
        if request.outputs is None:
            return self.all_output_names
        for name in request.outputs:
            if name not in self.outputs:
                raise InvalidArgumentError(
                    f"unexpected inference output '{name}' for model '{self.name}', "
                    f"expected one of {sorted(self.outputs)}"
                )
        return tuple(request.outputs)

    def finisher(self, names: Sequence[str], batch_size: int) -> FinishOutputs:
        """What turns the engine's outputs into the client's shapes: nothing to do unless an
        output has a ``reshape`` (decided once at load)."""
        if not self._output_reshapes:
            return _unchanged
        specs = [self.outputs[n] for n in names]
        batching = self.batching

        def finish(results: list[np.ndarray]) -> list[np.ndarray]:
            finished = []
            for spec, result in zip(specs, results):
                array = np.asarray(result)
                if spec.reshape is not None:
                    array = array.reshape((batch_size, *spec.dims) if batching else spec.dims)
                finished.append(array)
            return finished

        return finish

    def execution_failed(
        self, instance: Instance, exc: BaseException, starts: Sequence[int]
    ) -> BaseException:
        """Account for an execution that raised: the instance goes back (or, when the backend
        itself failed or hung, is replaced, and never handed to a waiting request first), each
        request counts as failed; returns the error to raise."""
        now = time.perf_counter_ns()
        for start in starts:
            self.statistics.record_failure(now - start)
        if isinstance(exc, EnginehouseError | asyncio.CancelledError):
            self.pool.release(instance)
        else:
            self.replace_instance(instance, exc)
        return self.internal_error(exc)

    def submit(self, request: InferRequest) -> InferResponse | Awaitable[InferResponse]:
        """Validate, then run at once when a free instance may run inline on this thread;
        otherwise return the awaitable that waits for an instance and runs there."""
        clock = time.perf_counter_ns
        start = request.arrival_ns or clock()
        try:
            feeds, batch_size = self._check_inputs(request)
            names = self._output_names(request)
        except EnginehouseError:
            self.statistics.record_failure(clock() - start)
            raise
        input_bytes = sum(a.nbytes for a in feeds.values())
        limits = self.limits
        if (
            self.in_flight >= limits.max_requests
            or self.pending_bytes + input_bytes > limits.max_bytes
        ):
            self.statistics.record_failure(clock() - start)
            raise UnavailableError(
                f"model '{self.name}' has {self.in_flight} requests ({self.pending_bytes} "
                f"bytes) pending, the most this server holds per model "
                f"({limits.max_requests} requests, {limits.max_bytes} bytes); retry later"
            )
        request.admitted_ns = clock()
        if self.batched is not None:
            return self.batched.enqueue(request, feeds, batch_size, names, start, input_bytes)
        pool = self.pool
        instance = pool.try_acquire()
        if instance is None or not instance.policy.inline(input_bytes):
            # Counted from admission, not from when the coroutine first runs: an unload that
            # comes in between must wait for this request, not shut its instance down.
            self.in_flight += 1
            self.pending_bytes += input_bytes
            return self._run_async(request, feeds, batch_size, names, instance, input_bytes, start)
        return self._run_inline(request, feeds, batch_size, names, instance, start)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request and return its response."""
        result = self.submit(request)
        return result if isinstance(result, InferResponse) else await result

    def internal_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, EnginehouseError | asyncio.CancelledError):
            return exc
        return InternalError(f"model '{self.name}' version {self.version} failed: {exc}")

    def replace_instance(self, instance: Instance, cause: BaseException) -> None:
        """Take a failed instance out of service and load a fresh one in the background."""
        log.error(
            "model '%s' version %s: instance %s failed (%s); replacing it",
            self.name,
            self.version,
            instance.name,
            cause,
        )
        self.pool.remove(instance)
        self.failed_instances += 1
        if self.instance_factory is None:
            return
        factory = self.instance_factory

        async def replace() -> None:
            await asyncio.to_thread(instance.close)
            self.warming_instances += 1
            try:
                fresh = await asyncio.to_thread(factory, instance.name, instance.placement)
            except Exception:
                log.exception("model '%s': cannot replace instance %s", self.name, instance.name)
                return
            finally:
                self.warming_instances -= 1
            self.replacements += 1
            self.pool.add(fresh)
            log.info(
                "model '%s' version %s: instance %s replaced and warm",
                self.name,
                self.version,
                fresh.name,
            )

        task = asyncio.get_running_loop().create_task(replace())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _run_inline(
        self,
        request: InferRequest,
        feeds: dict[str, np.ndarray],
        batch_size: int,
        names: tuple[str, ...],
        instance: Instance,
        start: int,
    ) -> InferResponse:
        """Execute on this thread with an instance already taken from the pool."""
        queued = time.perf_counter_ns()
        try:
            execution = instance.execute_sync(
                lambda: feeds, names, self.finisher(names, batch_size)
            )
        except BaseException as exc:
            raise self.execution_failed(instance, exc, (start,)) from exc
        self.pool.release(instance)
        return self._respond(request, names, batch_size, execution, start, queued)

    async def _run_async(
        self,
        request: InferRequest,
        feeds: dict[str, np.ndarray],
        batch_size: int,
        names: tuple[str, ...],
        instance: Instance | None,
        input_bytes: int,
        start: int,
    ) -> InferResponse:
        """Wait for an instance where none was free, run there; counted in ``in_flight`` by
        :meth:`submit`, uncounted here once settled."""
        pool = self.pool
        try:
            if instance is None:
                try:
                    instance = await pool.acquire()
                except BaseException:
                    self.statistics.record_failure(time.perf_counter_ns() - start)
                    raise
            if instance.policy.inline(input_bytes):
                return self._run_inline(request, feeds, batch_size, names, instance, start)
            queued = time.perf_counter_ns()
            future = instance.execute(lambda: feeds, names, self.finisher(names, batch_size))
            try:
                # Shielded: a cancelled request must not free an instance still executing.
                execution = await asyncio.shield(future)
            except asyncio.CancelledError:
                future.add_done_callback(lambda _: pool.release(instance))
                self.statistics.record_failure(time.perf_counter_ns() - start)
                raise
            except BaseException as exc:
                raise self.execution_failed(instance, exc, (start,)) from exc
            pool.release(instance)
            return self._respond(request, names, batch_size, execution, start, queued)
        finally:
            self.in_flight -= 1
            self.pending_bytes -= input_bytes

    def _respond(
        self,
        request: InferRequest,
        names: tuple[str, ...],
        batch_size: int,
        execution: Execution,
        start: int,
        queued: int,
    ) -> InferResponse:
        stats = self.statistics
        stats.record_execution(
            batch_size if self.batching else 1,
            execution.input_ns,
            execution.infer_ns,
            execution.output_ns,
        )
        specs = self.outputs
        outputs = [
            OutputTensor(name, specs[name].datatype, array.shape, array)
            for name, array in zip(names, execution.outputs)
        ]
        stats.record_success(
            time.perf_counter_ns() - start,
            queued - request.admitted_ns,
            execution.input_ns,
            execution.infer_ns,
            execution.output_ns,
        )
        return InferResponse(self.name, self.version, request.id, outputs)

    async def warm_request_path(self, count: int = 3) -> None:
        """Send ``count`` requests through validation, scheduling and execution, then forget
        them: the first real request must not be the first to run this Python code."""
        if not self.warmup_inputs:
            return
        for _ in range(count):
            inputs = [
                InferInput(name, self.inputs[name].datatype, array.shape, array)
                for name, array in self.warmup_inputs.items()
                if name in self.inputs
            ]
            await self.infer(InferRequest(self.name, inputs, self.version))

    def start_health_checks(self, interval_s: float) -> None:
        """Every ``interval_s``, run a warm-up inference on each idle instance; one that
        fails is replaced. Busy instances are skipped: traffic proves them."""
        if interval_s <= 0 or not self.warmup_inputs:
            return
        task = asyncio.get_running_loop().create_task(self._health_loop(interval_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _health_loop(self, interval_s: float) -> None:
        names = list(self.all_output_names)
        inputs = to_engine_shapes(self.config, self.warmup_inputs)
        while True:
            await asyncio.sleep(interval_s)
            for _ in range(len(self.pool.all())):
                instance = self.pool.try_acquire()
                if instance is None:
                    break
                try:
                    await asyncio.shield(instance.execute(lambda: inputs, names, list))
                except Exception as exc:
                    self.replace_instance(instance, exc)
                    continue
                self.health_checks += 1
                self.pool.release(instance)

    def reset_statistics(self) -> None:
        """Forget warm-up traffic: statistics start at zero when the version goes live."""
        recent = self.statistics.recent
        self.statistics = ModelStatistics(self.name, self.version)
        if recent is not None:
            self.statistics.keep_recent(recent.maxlen or 1024)
        self.pool.wait_ns = 0

    async def shutdown(self) -> None:
        """Fail what is still queued, let running executions finish, release every instance."""
        if self.batched is not None:
            await self.batched.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Release every instance; the version must have no requests in flight."""
        for instance in self.pool.all():
            instance.close()
