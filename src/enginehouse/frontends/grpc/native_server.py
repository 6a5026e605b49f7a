"""The native gRPC frontend's listener: its connections, the calls under way, shutdown.

The connections themselves (HTTP/2 framing, flow control, dispatch) are
:class:`~enginehouse.frontends.grpc.native.NativeGrpcProtocol`; what answers their calls is
given (:class:`~enginehouse.frontends.grpc.native.Calls`): the service in the core's process,
the relay in a gRPC worker. This module imports nothing of the core, so that a worker stays
small.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from enginehouse.frontends.grpc.native import Calls, NativeGrpcProtocol
from enginehouse.frontends.security import RestrictedApis, TlsSettings

log = logging.getLogger(__name__)


class NativeGrpcServer:
    """The gRPC frontend on the native HTTP/2 layer: a listening port (shared with the other
    workers when ``reuse_port``) and the connections it accepted."""

    def __init__(
        self,
        calls: Calls,
        host: str,
        port: int,
        max_message_bytes: int,
        restricted: RestrictedApis | None = None,
        tls: TlsSettings | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.calls = calls
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.restricted = restricted or RestrictedApis()
        self.tls = tls
        self.connections: set[NativeGrpcProtocol] = set()
        self._calls: set[asyncio.Future[Any]] = set()
        self._server: asyncio.Server | None = None
        self._private: asyncio.Server | None = None

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
            lambda: NativeGrpcProtocol(self),
            self.host,
            self.port,
            ssl=context,
            backlog=1024,
            reuse_port=self.reuse_port or None,
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("gRPC service (native HTTP/2) listening on %s:%d", self.host, self.port)

    async def listen_privately(self) -> int:
        """A further, plain listener on a loopback port of this process alone (a worker's,
        through which the core warms it up); the port."""
        loop = asyncio.get_running_loop()
        self._private = await loop.create_server(
            lambda: NativeGrpcProtocol(self), "127.0.0.1", 0, family=socket.AF_INET
        )
        return int(self._private.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._private is not None:
            self._private.close()
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
