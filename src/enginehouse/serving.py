"""A whole server: the core and its frontends, started and stopped in order.

``enginehouse serve`` assembles one from its flags (``cli.assemble``) and runs it until a
signal; the in-process test harness runs the same assembly on a thread of its own, so the
server a test drives is the server a user runs, less the process around it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from enginehouse.core.server import ServerCore
from enginehouse.frontends.grpc.native_server import NativeGrpcServer
from enginehouse.frontends.grpc.relay import GrpcWorkers
from enginehouse.frontends.grpc.service import GrpcServer
from enginehouse.frontends.http.app import HttpServer
from enginehouse.frontends.metrics import MetricsServer

log = logging.getLogger("enginehouse")

Frontend = HttpServer | GrpcServer | NativeGrpcServer | GrpcWorkers | MetricsServer


class Server:
    """The core and the frontends that ``args`` ask for, started and stopped together."""

    def __init__(
        self,
        core: ServerCore,
        frontends: Sequence[Frontend],
        exit_timeout_s: float = 30.0,
    ) -> None:
        self.core = core
        self.frontends = list(frontends)
        self.exit_timeout_s = exit_timeout_s

    def frontend(self, kind: type[Frontend]) -> Frontend | None:
        """The frontend of that type, if the server has one."""
        return next((f for f in self.frontends if isinstance(f, kind)), None)

    async def listen(self) -> None:
        """Bind every frontend's port (port 0: one the kernel picks, read back after); if one
        cannot bind, the others close again and the OSError propagates."""
        started: list[Frontend] = []
        try:
            for frontend in self.frontends:
                await frontend.start()
                started.append(frontend)
        except OSError:
            for frontend in started:
                await frontend.stop()
            raise

    async def load(self) -> None:
        """Load the start-up models; logs whether the server is ready."""
        await self.core.start()
        log.info("server ready: %s", "yes" if self.core.ready else "no (a model failed to load)")

    async def stop(self) -> None:
        """Drain requests in flight (bounded by --exit-timeout-secs), then close the ports."""
        log.info("shutting down: draining requests in flight")
        await self.core.stop(self.exit_timeout_s)
        for frontend in self.frontends:
            await frontend.stop()
        log.info("stopped")
