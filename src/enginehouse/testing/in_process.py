"""The whole server in this process: ``enginehouse serve``'s assembly on a thread of its own.

The core, the HTTP app, the gRPC service and the metrics endpoint are wired exactly as the
command wires them (``cli.assemble``), from the same flags, and listen on loopback ports the
kernel picks; only the process around them is missing. A test drives it with tritonclient
as it would a real server, without paying for an interpreter start and its imports. Its log
holds what this server logged (each server's tasks and worker threads carry its identity).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from enginehouse import cli
from enginehouse.testing.process import free_port
from enginehouse.testing.running import RunningServer, serve_arguments

if TYPE_CHECKING:
    import argparse

    from enginehouse.serving import Server


# Which in-process server the running code belongs to; log records are filed by it.
_SERVER = contextvars.ContextVar[int]("enginehouse_in_process_server", default=0)
_NUMBERS = itertools.count(1)
_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


class _ServerLog(logging.Handler):
    """Keeps the records that one server's code logs, as the command would print them."""

    def __init__(self, number: int, path: Path | None) -> None:
        super().__init__(logging.DEBUG)
        self.number = number
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter(_FORMAT))
        self._file = open(path, "a", encoding="utf-8") if path else None

    def emit(self, record: logging.LogRecord) -> None:
        if _SERVER.get() != self.number:
            return
        line = self.format(record)
        self.lines.append(line)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class InProcessServer(RunningServer):
    """``enginehouse serve <flags>`` on a thread of this process, on loopback ports."""

    def _start(self) -> None:
        args = cli.build_parser().parse_args(
            serve_arguments(self.repositories, self.fixed_ports, self.extra)
        )
        if args.grpc_workers > 0 and not args.grpc_port:
            args.grpc_port = free_port()  # worker processes share one port they all bind
        self.number = next(_NUMBERS)
        self._log = _ServerLog(self.number, self.log_path)
        logger = logging.getLogger("enginehouse")
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self._log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._server: Server
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(args,), name=f"enginehouse-{self.number}", daemon=True
        )
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            self._close_log()
            raise self._error

    def _run(self, args: argparse.Namespace) -> None:
        _SERVER.set(self.number)
        cli.quiet_numpy()
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix=f"eh{self.number}"))
        self._loop = loop
        try:
            loop.run_until_complete(self._main(args))
        except BaseException as exc:  # reported by stop() or the constructor
            self._error = self._error or exc
            self._bound.set()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            self._done = True

    async def _main(self, args: argparse.Namespace) -> None:
        self._stop = asyncio.Event()
        server = self._server = cli.assemble(args)
        try:
            await server.listen()
        except BaseException as exc:
            self._error = exc
            self._bound.set()
            return
        from enginehouse.frontends.grpc.native_server import NativeGrpcServer
        from enginehouse.frontends.grpc.relay import GrpcWorkers
        from enginehouse.frontends.grpc.service import GrpcServer
        from enginehouse.frontends.http.app import HttpServer
        from enginehouse.frontends.metrics import MetricsServer

        for kind, attribute in (
            (HttpServer, "http_port"),
            (GrpcServer, "grpc_port"),
            (NativeGrpcServer, "grpc_port"),
            (GrpcWorkers, "grpc_port"),
            (MetricsServer, "metrics_port"),
        ):
            frontend = server.frontend(kind)
            if frontend is not None or not hasattr(self, attribute):
                setattr(self, attribute, frontend.port if frontend is not None else 0)
        self._bound.set()
        load = asyncio.create_task(server.load())
        await self._stop.wait()
        if not load.done():
            load.cancel()
        await server.stop()

    def log(self) -> str:
        return "\n".join(self._log.lines)

    def exited(self) -> bool:
        return self._done

    def stop(self, timeout_s: float = 60.0) -> int:
        loop, stop = self._loop, self._stop
        if not self._done and loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout_s)
        self._close_log()
        if self._thread.is_alive():
            return 1
        return 0 if self._error is None else 1

    def _close_log(self) -> None:
        logging.getLogger("enginehouse").removeHandler(self._log)
        self._log.close()
