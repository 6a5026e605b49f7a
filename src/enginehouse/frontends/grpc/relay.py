"""gRPC frontends in several processes: the core's side of the relay.

grpc.aio costs a few hundred microseconds of Python per call, so one process tops out at a
few thousand calls a second while a GPU engine can answer many more (DESIGN decision 5).
With ``--grpc-workers N`` the server starts N worker processes (worker.py) that all listen on
the gRPC port (SO_REUSEPORT) and hand each call, still serialised, over a Unix socket to
this process. Here a call is parsed, run by the same :class:`InferenceService` as in the
one-process mode, and its serialised response or status goes back. The relay's frames:

    request:  u32 length | u32 call id | u8 method | message bytes
    response: u32 length | u32 call id | u8 status | message bytes (or UTF-8 details)

A worker announces itself with method 255 once its gRPC port is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from enginehouse.core.server import ServerCore
from enginehouse.frontends.grpc.frames import HELLO, METHODS, Coalescer, frame, read_frame
from enginehouse.frontends.grpc.service import InferenceService

log = logging.getLogger(__name__)

REQUESTS: dict[str, Any] = {name: getattr(pb, f"{name}Request") for name in METHODS}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RelayContext:
    """What the service's methods use of a ServicerContext: abort."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)


class GrpcWorkers:
    """The relay socket and the worker processes that serve gRPC through it."""

    def __init__(
        self, core: ServerCore, host: str, port: int, max_message_bytes: int, workers: int
    ) -> None:
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.count = workers
        self.service = InferenceService(core)
        self._folder = Path(tempfile.mkdtemp(prefix="enginehouse-relay-"))
        self.path = self._folder / "relay.sock"
        self._server: asyncio.AbstractServer | None = None
        self._processes: list[subprocess.Popen[bytes]] = []
        self._hello: asyncio.Queue[int] = asyncio.Queue()
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.port == 0:
            raise OSError("--grpc-workers needs a fixed --grpc-port (the workers share it)")
        self._server = await asyncio.start_unix_server(
            self._connection, path=str(self.path), limit=self.max_message_bytes + 64
        )
        for _ in range(self.count):
            self._processes.append(self._spawn())
        for _ in range(self.count):
            try:
                await asyncio.wait_for(self._hello.get(), timeout=60)
            except TimeoutError:
                await self.stop()
                raise OSError(f"gRPC workers did not bind {self.host}:{self.port}") from None
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        log.info(
            "gRPC service listening on %s:%d (%d worker processes)",
            self.host,
            self.port,
            self.count,
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "enginehouse.frontends.grpc.worker",
                str(self.path),
                self.host,
                str(self.port),
                str(self.max_message_bytes),
            ]
        )

    async def _watch(self) -> None:
        """Replace a worker that died (its clients reconnect to the others meanwhile)."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, process in enumerate(self._processes):
                if process.poll() is not None and not self._stopping:
                    log.error(
                        "gRPC worker %d exited (%s); restarting it", process.pid, process.returncode
                    )
                    self._processes[index] = self._spawn()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out = Coalescer(writer)
        try:
            while True:
                call, method, payload = await read_frame(reader)
                if method == HELLO:
                    self._hello.put_nowait(call)
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._call(out, call, method, payload)
                )
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _call(self, out: Coalescer, call: int, method: int, payload: bytes) -> None:
        code = grpc.StatusCode.OK
        try:
            name = METHODS[method]
            request = REQUESTS[name].FromString(payload)
            response = await getattr(self.service, name)(request, RelayContext())
            answer = response.SerializeToString()
        except _Abort as abort:
            code, answer = abort.code, abort.details.encode()
        except Exception as exc:  # a broken call must not end the connection
            log.exception("relayed gRPC call failed")
            code, answer = grpc.StatusCode.INTERNAL, f"internal error: {exc}".encode()
        out.write(frame(call, code.value[0], answer))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Let the workers finish their calls (the relay still answers), then close it."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace_s + 5
        for process in self._processes:
            while process.poll() is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            if process.poll() is None:
                process.kill()
                process.wait()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self._folder)
