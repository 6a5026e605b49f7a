"""Restricted APIs and TLS on a grpc.aio server, in process and in the worker processes.

The interceptor sees every call's method and metadata before any handler runs, so one check
covers the generated servicer of the in-process service and the relay handlers of the
workers alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from enginehouse.errors import PermissionDeniedError
from enginehouse.frontends.security import RestrictedApis, TlsSettings

# Each GRPCInferenceService method's API group, as Triton groups them.
METHOD_GROUPS = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


def _denied(message: str, streaming: bool) -> grpc.RpcMethodHandler:
    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    if streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class RestrictionInterceptor(grpc.aio.ServerInterceptor):
    """Answers PERMISSION_DENIED to calls of a restricted group without its header."""

    def __init__(self, restricted: RestrictedApis) -> None:
        self._restricted = restricted

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method.rpartition("/")[2]  # type: ignore[attr-defined]
        group = METHOD_GROUPS.get(method)
        if group is not None and group in self._restricted.rules:
            headers = {key: value for key, value in details.invocation_metadata or ()}  # type: ignore[attr-defined]
            try:
                self._restricted.check(group, headers)
            except PermissionDeniedError as exc:
                return _denied(exc.message, method == "ModelStreamInfer")
        return await continuation(details)


def interceptors(restricted: RestrictedApis) -> list[grpc.aio.ServerInterceptor]:
    return [RestrictionInterceptor(restricted)] if restricted else []


def bind(server: grpc.aio.Server, address: str, tls: TlsSettings | None) -> int:
    """Listen on ``address``, over TLS when ``tls`` is set; the port bound (0: failed)."""
    if tls is None:
        return int(server.add_insecure_port(address))
    credentials = grpc.ssl_server_credentials(
        [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
        root_certificates=Path(tls.root).read_bytes() if tls.root else None,
        require_client_auth=tls.mutual,
    )
    return int(server.add_secure_port(address, credentials))
