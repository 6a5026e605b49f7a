"""A loaded model version: what it serves, and the checks a request passes before it runs.

Everything a request is checked against is computed once at load (tensor specs, output
names); the check does dictionary lookups and array views, nothing more. How and when a
checked request runs is its :class:`~enginehouse.scheduler.base.Scheduler`'s business.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.builder.artifacts import BuiltEngine
from enginehouse.config.model_config import to_engine_shapes
from enginehouse.config.tensors import input_specs, output_specs
from enginehouse.errors import EnginehouseError, InvalidArgumentError
from enginehouse.messages import (
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    RegionTensor,
    Tensor,
    TensorMetadata,
)
from enginehouse.scheduler.base import Scheduler, Work
from enginehouse.scheduler.statistics import ModelStatistics


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
    """One version of a model, loaded: its config, its checks, and its scheduler."""

    def __init__(self, config: mc.ModelConfig, version: int, scheduler: Scheduler) -> None:
        self.config = config
        self.name = config.name
        self.version = str(version)
        self.scheduler = scheduler
        self.max_batch_size = config.max_batch_size
        self.batching = config.max_batch_size > 0
        self.inputs = input_specs(config)
        self.outputs = output_specs(config)
        self.required_inputs = frozenset(n for n, s in self.inputs.items() if not s.optional)
        self.all_output_names = tuple(self.outputs)
        # Inputs (client shapes) of a warm-up sample; the server sends a few requests through
        # the whole request path with them before the version becomes ready.
        self.warmup_inputs: dict[str, np.ndarray] = {}
        # The engine the instances loaded (the source, or a built artefact and its manifest).
        self.engine: BuiltEngine | None = None
        # What the version was loaded from (files and config); a reload keeps it when equal.
        self.identity = ""
        # Device memory one instance took when loaded, by device label (GPU instances).
        self.instance_memory: dict[str, int] = {}

    @property
    def statistics(self) -> ModelStatistics:
        return self.scheduler.statistics

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered."""
        return self.scheduler.in_flight

    @property
    def writes_host_outputs(self) -> bool:
        """Whether its instances may write outputs into mapped regions themselves."""
        return self.scheduler.writes_host_outputs

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

    def _check_inputs(self, request: InferRequest) -> tuple[dict[str, Tensor], int, bool]:
        """The engine feeds, the batch size and whether an input waits in a shared-memory
        region, or a 400 naming what is wrong."""
        feeds: dict[str, Tensor] = {}
        in_regions = False
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
            if type(data) is RegionTensor:
                in_regions = True
            feeds[item.name] = data
        if len(feeds) < len(self.required_inputs) or not self.required_inputs.issubset(feeds):
            missing = sorted(self.required_inputs.difference(feeds))
            raise InvalidArgumentError(
                f"expected {len(self.required_inputs)} inputs but got {len(feeds)} inputs for "
                f"model '{model}'; missing required input(s) {missing}"
            )
        return feeds, batch_size, in_regions

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

    def submit(self, request: InferRequest) -> InferResponse | Awaitable[InferResponse]:
        """Check the request, then hand it to the scheduler: the response at once where it
        ran inline, else an awaitable of it."""
        start = request.arrival_ns or time.perf_counter_ns()
        try:
            feeds, batch_size, in_regions = self._check_inputs(request)
            names = self._output_names(request)
        except EnginehouseError:
            self.statistics.record_failure(time.perf_counter_ns() - start)
            raise
        nbytes = sum(a.nbytes for a in feeds.values())
        work = Work(request, feeds, names, batch_size, start, nbytes, in_regions)
        return self.scheduler.submit(work)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request and return its response."""
        result = self.submit(request)
        return result if isinstance(result, InferResponse) else await result

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
        fails is replaced."""
        if self.warmup_inputs:
            inputs = to_engine_shapes(self.config, self.warmup_inputs)
            self.scheduler.instances.start_health_checks(interval_s, inputs, self.all_output_names)

    def reset_statistics(self) -> None:
        """Forget warm-up traffic: statistics start at zero when the version goes live."""
        recent = self.statistics.recent
        self.scheduler.statistics = ModelStatistics(self.name, self.version)
        if recent is not None:
            self.statistics.keep_recent(recent.maxlen or 1024)
        self.scheduler.instances.pool.wait_ns = 0

    async def shutdown(self) -> None:
        """Fail what is still queued, let running executions finish, release every instance."""
        await self.scheduler.close()
        await asyncio.to_thread(self.scheduler.instances.close)
