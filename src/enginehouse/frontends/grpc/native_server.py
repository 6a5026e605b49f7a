"""The native gRPC frontend's listener: its connections, the calls under way, shutdown.

The connections themselves (HTTP/2 framing, flow control, dispatch) are
:class:`~enginehouse.frontends.grpc.native.NativeGrpcProtocol`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from enginehouse.core.server import ServerCore
from enginehouse.frontends.grpc.native import NativeGrpcProtocol
from enginehouse.frontends.grpc.service import InferenceService
from enginehouse.frontends.security import RestrictedApis, TlsSettings

log = logging.getLogger(__name__)


class NativeGrpcServer:
    """The gRPC frontend on the HTTP/2 layer above, in the core's process."""

    def __init__(
        self,
        core: ServerCore,
        host: str,
        port: int,
        max_message_bytes: int,
        restricted: RestrictedApis | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.core = core
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.restricted = restricted or RestrictedApis()
        self.tls = tls
        self.service = InferenceService(core)
        self.connections: set[NativeGrpcProtocol] = set()
        self._calls: set[asyncio.Future[Any]] = set()
        self._server: asyncio.Server | None = None

    def keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a task until it is done (the event loop keeps only weak references)."""
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def start(self) -> None:
        context = None
        if self.tls is not None:
            context = self.tls.ssl_context()
            context.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: NativeGrpcProtocol(self), self.host, self.port, ssl=context, backlog=1024
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("gRPC service (native HTTP/2) listening on %s:%d", self.host, self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.goaway()
        deadline = asyncio.get_running_loop().time() + grace_s
        while any(c.busy for c in self.connections):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if connection._transport is not None:
                connection._transport.close()
        await self._server.wait_closed()
