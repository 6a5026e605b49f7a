"""The metrics endpoint: ``GET /metrics`` in Prometheus text format on its own port."""

from __future__ import annotations

import asyncio
import logging

from enginehouse.core.server import ServerCore
from enginehouse.frontends.http.connections import Connections, HttpLimits
from enginehouse.frontends.http.protocol import HttpProtocol, HttpRequest, HttpResponse
from enginehouse.observe import metrics
from enginehouse.observe.system import SystemMonitor

log = logging.getLogger(__name__)

_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """Serves the current metrics of a ServerCore."""

    def __init__(
        self, core: ServerCore, host: str, port: int, options: metrics.MetricsOptions
    ) -> None:
        self.core = core
        self.options = options
        self.monitor = SystemMonitor()
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections = Connections(HttpLimits(body_bytes=1 << 20))

    def handle(self, request: HttpRequest) -> HttpResponse:
        if request.path != "/metrics":
            return HttpResponse(404, [b'{"error":"only /metrics is served here"}'])
        body = metrics.render(
            self.core.served_versions(), self.monitor, self.options, self.core.load_outcomes
        )
        return HttpResponse(200, [body], content_type=_CONTENT_TYPE)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self.handle, self._connections),
            self.host,
            self.port,
            reuse_address=True,
        )
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics service listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in self._connections:
                connection.close()
            self._connections.stop()
            await self._server.wait_closed()
