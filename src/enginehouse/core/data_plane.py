"""The data plane: inference requests and what a client may ask of a served model.

It routes each request through the registry to a model version, and refuses new ones
once the server drains. Nothing here loads or unloads.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Awaitable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.core import mapping_guard
from enginehouse.core.registry import ModelRegistry
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.errors import InvalidArgumentError, UnavailableError
from enginehouse.messages import InferRequest, InferResponse, ModelMetadata, OutputTensor
from enginehouse.scheduler.statistics import ModelStatistics

_NO_DATA = np.empty(0, np.uint8)
log = logging.getLogger(__name__)


class DataPlane:
    """Requests, model metadata, configs and statistics over the registry's served models."""

    def __init__(
        self,
        registry: ModelRegistry,
        map_shared_memory: bool | None = None,
        pin_shared_memory: bool | None = None,
    ) -> None:
        self.registry = registry
        self.draining = False
        # The system and CUDA shared-memory regions clients registered (both protocols
        # share them).
        self.shared_memory = SharedMemoryRegions(
            _mapped_by_default(map_shared_memory),
            _has_gpu() if pin_shared_memory is None else pin_shared_memory,
        )

    def submit(self, request: InferRequest) -> InferResponse | Awaitable[InferResponse]:
        """The response at once when the model ran inline, else an awaitable of it.

        Frontends use this to skip a task switch for small models; :meth:`infer` is the
        plain form.
        """
        if self.draining:
            raise UnavailableError("server is shutting down")
        version = self.registry.resolve(request.model_name, request.model_version)
        if request.output_regions is None and request.regions_in_place is None:
            return version.submit(request)
        if request.output_regions is not None:
            request.output_targets = self.shared_memory.output_targets(
                request.output_regions, host=version.writes_host_outputs
            )
        result = version.submit(request)
        if isinstance(result, InferResponse):
            return self._into_regions(request, result)
        return self._await_into_regions(request, result)

    def _into_regions(self, request: InferRequest, response: InferResponse) -> InferResponse:
        """Write the outputs bound for shared memory into their regions; the response then
        names the region of each instead of carrying its data. Inputs read in place from
        a mapped region are checked first: one truncated under its mapping while the request
        ran was read as zeros, so the request fails (400)."""
        for region in request.regions_in_place or ():
            region.check_whole("input")
        targets = request.output_regions or {}
        in_place = request.output_targets or {}
        outputs = []
        for tensor in response.outputs:
            target = targets.get(tensor.name)
            if target is None:
                outputs.append(tensor)
                continue
            engine = in_place.get(tensor.name)
            if (
                engine is not None
                and engine.written is not None
                and self.shared_memory.registered(target, tensor.name) is engine.region
            ):
                # The engine wrote it there itself (on the device, or in the mapping).
                written = self.shared_memory.written_in_place(target, engine, tensor.name)
            else:
                written = self.shared_memory.write(target, tensor.data, tensor.name)
            parameters: dict[str, object] = {
                "shared_memory_region": target.region,
                "shared_memory_byte_size": written,
            }
            if target.offset:
                parameters["shared_memory_offset"] = target.offset
            outputs.append(
                OutputTensor(tensor.name, tensor.datatype, tensor.shape, _NO_DATA, parameters)
            )
        response.outputs = outputs
        return response

    async def _await_into_regions(
        self, request: InferRequest, pending: Awaitable[InferResponse]
    ) -> InferResponse:
        return self._into_regions(request, await pending)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request on the version it addresses."""
        result = self.submit(request)
        return result if isinstance(result, InferResponse) else await result

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        target = self.registry.resolve(name, version)
        return target.metadata(list(self.registry.served[name].versions))

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self.registry.resolve(name, version).config

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Statistics of one version, all versions of a model, or every ready version."""
        registry = self.registry
        if not name:
            if version:
                raise InvalidArgumentError("a version needs a model name")
            return [v.statistics for v in registry.served_versions()]
        if version:
            return [registry.resolve(name, version).statistics]
        model = registry.served.get(name)
        if model is None:
            registry.resolve(name)
            return []
        return [v.statistics for v in model.versions.values()]


def _mapped_by_default(asked: bool | None) -> bool:
    """Whether system regions are mapped: as asked, else where the mapping guard is built
    and the machine has no GPU. Mapped, a CPU model reads its inputs in place (1 MB in and
    out over HTTP: 0.37x tritonserver's rate through descriptors, 0.54-0.56x mapped, on the
    2-core machine); a GPU model reads them into its pinned staging buffers either way, and
    on the H200 host served ResNet-50 from system shared memory ran 7-16% slower with
    regions mapped (the cause was not found)."""
    if asked is not None:
        return asked
    if not mapping_guard.AVAILABLE:
        log.warning(
            "system shared-memory regions are read through their descriptors: the mapping "
            "guard was not built (no C compiler at install)"
        )
        return False
    return not _has_gpu()


def _has_gpu() -> bool:
    """Whether the machine has an NVIDIA GPU. Its device files say, not the driver:
    initialising CUDA here, before the gRPC workers start, is what the server otherwise never
    does. Where it has one, system regions are pinned when registered (after the workers
    started), so that GPU models take inputs from them by DMA."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))
