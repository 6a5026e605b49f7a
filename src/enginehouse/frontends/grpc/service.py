"""The GRPCInferenceService of KServe v2 / Triton on grpcio's asyncio server.

The service class is the generated servicer from ``tritonclient.grpc`` (one source of
truth for the wire format); each method translates to a ServerCore call. Errors are the
status code their :class:`EnginehouseError` carries; on a stream they travel in the
response's ``error_message``, as Triton sends them, and the stream stays open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from enginehouse import datatypes
from enginehouse.core.model import ModelVersion
from enginehouse.core.regions import CUDA, SYSTEM
from enginehouse.core.server import SERVER_NAME, ServerCore
from enginehouse.core.shared_memory import region_status
from enginehouse.errors import EnginehouseError, InvalidArgumentError
from enginehouse.frontends.grpc.access import bind, interceptors
from enginehouse.frontends.grpc.codec import (
    decode_infer_request,
    encode_infer_response,
    parameter_value,
    split_raw_contents,
)
from enginehouse.frontends.grpc.frames import UNSUPPORTED_RPCS
from enginehouse.frontends.grpc.options import server_options
from enginehouse.frontends.grpc.receive import LARGE_FRAME
from enginehouse.frontends.grpc.streams import answer_concurrently, stream_error
from enginehouse.frontends.grpc.templates import RequestTemplates
from enginehouse.frontends.security import RestrictedApis, TlsSettings
from enginehouse.messages import InferResponse

log = logging.getLogger(__name__)


_Status = TypeVar("_Status", pb.SystemSharedMemoryStatusResponse, pb.CudaSharedMemoryStatusResponse)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC of GRPCInferenceService over one ServerCore."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        # Small ModelInfer requests' metadata, decoded once per kind (templates.py).
        self._templates = RequestTemplates()

    async def warm(self, version: ModelVersion) -> None:
        """Run warm-up requests through the gRPC decoding, the new version (called directly:
        it is not routable until warm) and encoding, in process."""
        wire = warmup_request(version).SerializeToString()
        for _ in range(2):
            response = await version.infer(
                decode_infer_request(pb.ModelInferRequest.FromString(wire))
            )
            encode_infer_response(response).SerializeToString()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.core.version, extensions=list(self.core.extensions)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            meta = self.core.model_metadata(request.name, request.version)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        response = pb.ModelMetadataResponse(
            name=meta.name, versions=list(meta.versions), platform=meta.platform
        )
        for tensors, target in ((meta.inputs, response.inputs), (meta.outputs, response.outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        return response

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        try:
            config = self.core.model_config(request.name, request.version)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(config)
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        try:
            stats = self.core.model_statistics(request.name, request.version)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        response = pb.ModelStatisticsResponse()
        for entry in stats:
            # Triton's JSON shape is the message's JSON mapping: one description of both.
            json_format.ParseDict(entry.as_dict(), response.model_stats.add())
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self.core.repository_index(request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        config = None
        files: dict[str, bytes] = {}
        for key, value in request.parameters.items():
            if key == "config":
                config = value.string_param
            elif key.startswith("file:"):
                files[key[5:]] = value.bytes_param
        try:
            await self.core.load_model(request.model_name, config, files or None)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.core.unload_model(request.model_name)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return pb.RepositoryModelUnloadResponse()

    def infer_message(
        self,
        request: pb.ModelInferRequest,
        arrival: int,
        raw: Sequence[memoryview] | None = None,
    ) -> InferResponse | Awaitable[InferResponse]:
        """The core's response at once when the model ran inline, else an awaitable of it;
        the caller encodes it as its transport prefers (a large one as pieces, see
        ``encode_infer_response_wire``); errors raise :class:`EnginehouseError`. ModelInfer,
        the native frontend and the worker relay all use it; ``raw`` is the request's raw
        input contents when they were cut out of the message itself."""
        infer_request = decode_infer_request(request, raw, self.core.shared_memory)
        infer_request.arrival_ns = arrival
        return self.core.submit(infer_request)

    def infer_wire(
        self, payload: bytes | memoryview, arrival: int
    ) -> InferResponse | Awaitable[InferResponse]:
        """:meth:`infer_message` for a serialized ModelInferRequest (a relayed frame, a native
        call's message): a large one has its tensors cut out first, so that they stay views of
        the payload rather than copies made by protobuf."""
        if len(payload) >= LARGE_FRAME:
            rest, raw = split_raw_contents(payload)
            return self.infer_message(pb.ModelInferRequest.FromString(rest), arrival, raw)
        request = self._templates.decode(payload, self.core.shared_memory)
        request.arrival_ns = arrival
        return self.core.submit(request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        result = self.infer_message(request, time.perf_counter_ns())
        if isinstance(result, InferResponse):
            return encode_infer_response(result)
        return encode_infer_response(await result)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise  # abort raises; this keeps type checkers sure of it

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        return await self._regions(SYSTEM, request.name, response, context)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        try:
            self.core.shared_memory.register(
                request.name, request.key, request.offset, request.byte_size
            )
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.core.shared_memory.unregister(request.name, SYSTEM)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        return await self._regions(CUDA, request.name, response, context)

    async def _regions(
        self, kind: str, name: str, response: _Status, context: grpc.aio.ServicerContext
    ) -> _Status:
        """``response`` with the status of one region of ``kind``, or of all of them."""
        try:
            regions = self.core.shared_memory.status(name, kind)
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        for region in regions:
            entry = response.regions[region.name]
            for field, value in region_status(region).items():
                setattr(entry, field, value)
        return response

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        try:
            self.core.shared_memory.register_cuda(
                request.name, request.raw_handle, request.device_id, request.byte_size
            )
        except EnginehouseError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.core.shared_memory.unregister(request.name, CUDA)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently; each response goes out when it is done."""

        async def answer(message: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                result = await self._infer(message)
            except EnginehouseError as exc:
                return stream_error(message, exc.message)
            return pb.ModelStreamInferResponse(infer_response=result)

        async for response in answer_concurrently(request_iterator, answer, context):
            yield response


def _unsupported(extension: str) -> Callable[..., Awaitable[None]]:
    """An RPC of a Triton extension this server does not offer yet: UNIMPLEMENTED, naming it
    (the generated servicer's default answers a bare "Method not implemented!" and logs a
    traceback)."""

    async def method(
        self: InferenceService, request: object, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"the {extension} extension is not supported by this server yet",
        )

    return method


for _name, _extension in UNSUPPORTED_RPCS.items():
    setattr(InferenceService, _name, _unsupported(_extension))


def warmup_request(version: ModelVersion) -> pb.ModelInferRequest:
    """A ModelInferRequest of the version's warm-up sample, addressed to that version."""
    message = pb.ModelInferRequest(model_name=version.name, model_version=version.version)
    for name, array in version.warmup_inputs.items():
        message.inputs.add(
            name=name, datatype=version.inputs[name].datatype, shape=list(array.shape)
        )
        message.raw_input_contents.append(datatypes.to_wire_bytes(array))
    return message


class GrpcServer:
    """grpcio's asyncio server with the inference service on one port."""

    def __init__(
        self,
        core: ServerCore,
        host: str,
        port: int,
        max_message_bytes: int,
        restricted: RestrictedApis | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self._server = grpc.aio.server(
            options=server_options(max_message_bytes, reuse_port=False),
            interceptors=interceptors(restricted or RestrictedApis()),
        )
        self.service = InferenceService(core)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, self._server)

    async def start(self) -> None:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        bound = bind(self._server, address, self.tls)
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {address}")
        self.port = bound
        await self._server.start()
        log.info("gRPC service listening on %s:%d", self.host, self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._server.stop(grace_s)


__all__ = [
    "GrpcServer",
    "InferenceService",
    "InvalidArgumentError",
    "parameter_value",
    "warmup_request",
]
