"""gRPC frontends in several processes: the core's side of the relay.

grpc.aio costs a few hundred microseconds of Python per call, so one process tops out at a
few thousand calls a second while a GPU engine can answer many more.
With ``--grpc-workers N`` the server starts N worker processes (worker.py) that all listen on
the gRPC port (SO_REUSEPORT) and hand each call, still serialised, over a Unix socket to
this process. Here a call is parsed, run by the same :class:`InferenceService` as in the
one-process mode, and its serialised response or status goes back. The relay's frames:

    request:  u32 length | u32 call id | u8 method | message bytes
    response: u32 length | u32 call id | u8 status | message bytes (or UTF-8 details)

A worker announces itself with method 255 once its gRPC port is bound (its private port
and its rings' number). Messages of 64 KB and more go through the worker's shared-memory
rings instead (ring.py): a request as method 254, an answer as status 253, each with the
place where it lies as payload; call id 0 frees places (status 254 from the core for
requests, method 253 from the worker for answers).
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
import time
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from enginehouse.core.server import ServerCore
from enginehouse.errors import EnginehouseError
from enginehouse.frontends.grpc.codec import encode_infer_response_wire
from enginehouse.frontends.grpc.frames import (
    HELLO,
    INTERNAL,
    METHODS,
    SERVICE,
    CallAborted,
    Coalescer,
)
from enginehouse.frontends.grpc.receive import FrameReceiver
from enginehouse.frontends.grpc.ring import (
    ANSWER_IN_RING,
    ANSWERS_TAKEN,
    INFER_IN_RING,
    CoreRing,
    make_ring,
)
from enginehouse.frontends.grpc.service import InferenceService, warmup_request
from enginehouse.frontends.security import RestrictedApis, TlsSettings
from enginehouse.messages import InferResponse

log = logging.getLogger(__name__)

REQUESTS: dict[str, Any] = {name: getattr(pb, f"{name}Request") for name in METHODS}
INFER = METHODS.index("ModelInfer")
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]


class _RelayProtocol(FrameReceiver):
    """One worker's connection: frames cut out of the byte stream as they arrive."""

    def __init__(self, owner: GrpcWorkers) -> None:
        super().__init__()
        self._owner = owner
        self._out: Coalescer | None = None
        # The worker's shared-memory ring, once its hello has named it.
        self._ring: CoreRing | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._out = Coalescer(transport)  # type: ignore[arg-type]

    def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
        out = self._out
        assert out is not None
        if code == HELLO:
            self._ring = self._owner.hello(payload, out)
            return
        if code == ANSWERS_TAKEN and call == 0 and self._ring is not None:
            self._ring.answers_taken(payload)
            return
        if code == INFER_IN_RING:
            try:
                if self._ring is None:
                    raise ValueError("this worker has no ring")
                payload = self._ring.request(payload)
            except ValueError as exc:
                out.send(call, INTERNAL, f"relay: {exc}".encode())
                return
            code = INFER
        self._owner.dispatch(out, call, code, payload, self._ring)


def _failure(exc: Exception, method: int) -> tuple[int, bytes]:
    """The status code and details a relayed call that raised ``exc`` answers with."""
    if isinstance(exc, CallAborted):
        return exc.code.value[0], exc.details.encode()
    if isinstance(exc, EnginehouseError):
        return exc.grpc_code.value[0], exc.message.encode()
    if isinstance(exc, DecodeError):
        return INVALID, f"malformed {METHODS[method]}Request: {exc}".encode()
    log.error("relayed gRPC call failed", exc_info=exc)
    return INTERNAL, f"internal error: {exc}".encode()


def _answer(
    out: Coalescer, ring: CoreRing | None, call: int, body: bytes | list[bytes | memoryview]
) -> None:
    """Send an inference's answer: through the worker's answer ring when it is large and
    fits, over the socket otherwise."""
    place = ring.answer(body) if ring is not None else None
    if place is None:
        out.send(call, 0, body)
    else:
        out.send(call, ANSWER_IN_RING, place)


def _answer_when_done(
    out: Coalescer, ring: CoreRing | None, call: int, future: asyncio.Future[InferResponse]
) -> None:
    """Send an inference's response (or its failure) once it has run."""
    if future.cancelled():
        out.send(call, CANCELLED, b"the request was cancelled")
        return
    exc = future.exception()
    if exc is not None:
        out.send(call, *_failure(exc if isinstance(exc, Exception) else Exception(exc), INFER))
        return
    try:
        # A large answer goes as pieces, its outputs' memory among them: not copied into a
        # message first.
        answer = encode_infer_response_wire(future.result())
    except Exception as failure:  # a broken response must not end the connection
        out.send(call, *_failure(failure, INFER))
        return
    _answer(out, ring, call, answer)


class RelayContext:
    """What the service's methods use of a ServicerContext: abort."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise CallAborted(code, details)


class GrpcWorkers:
    """The relay socket and the worker processes that serve gRPC through it."""

    def __init__(
        self,
        core: ServerCore,
        host: str,
        port: int,
        max_message_bytes: int,
        workers: int,
        restricted: RestrictedApis | None = None,
        tls: TlsSettings | None = None,
        frontend: str = "grpcio",
        ring_size: int = 0,
    ) -> None:
        # What serves gRPC in each worker: "native" (the HTTP/2 layer) or "grpcio".
        self.frontend = frontend
        # Each worker's shared-memory ring for large requests (0: none), by worker number.
        self.ring_size = ring_size
        self._rings: dict[int, CoreRing] = {}
        # What came through the rings of workers since replaced (see CoreRing.traffic).
        self._retired_traffic = [0, 0, 0, 0]
        self.restricted = restricted or RestrictedApis()
        self.tls = tls
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.count = workers
        self.core = core
        self.service = InferenceService(core)
        self._folder = Path(tempfile.mkdtemp(prefix="enginehouse-relay-"))
        self.path = self._folder / "relay.sock"
        self._server: asyncio.AbstractServer | None = None
        self._processes: list[subprocess.Popen[bytes]] = []
        self._hello: asyncio.Queue[int] = asyncio.Queue()
        # Each worker's own loopback port (0: it has none), as its hello announced.
        self.private_ports: list[int] = []
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        if self.port == 0:
            raise OSError("--grpc-workers needs a fixed --grpc-port (the workers share it)")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _RelayProtocol(self), path=str(self.path)
        )
        for index in range(self.count):
            self._processes.append(self._spawn(index))
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

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        """Worker ``index`` with a new ring of its own (the old one's place in the core
        goes once the requests still in it are done)."""
        fd = make_ring(self.ring_size) if self.ring_size else -1
        old = self._rings.pop(index, None)
        if old is not None:
            self._retired_traffic = [a + b for a, b in zip(self._retired_traffic, old.traffic)]
        try:
            if fd >= 0:
                self._rings[index] = CoreRing(fd)
            return self._popen(index, fd)
        finally:
            if fd >= 0:
                os.close(fd)  # the core's mapping and the worker's descriptor keep it

    def _popen(self, index: int, ring_fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "enginehouse.frontends.grpc.worker",
                str(self.path),
                self.host,
                str(self.port),
                str(self.max_message_bytes),
                self.restricted.to_json(),
                self.tls.to_json() if self.tls else "null",
                self.frontend,
                str(ring_fd),
                str(index),
            ],
            pass_fds=(ring_fd,) if ring_fd >= 0 else (),
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
                    self._processes[index] = self._spawn(index)

    def dispatch(
        self,
        out: Coalescer,
        call: int,
        method: int,
        payload: bytes | memoryview,
        ring: CoreRing | None = None,
    ) -> None:
        """Answer one relayed call: inline-executed inferences at once, batched ones when their
        future resolves, the rest in a task; large answers through ``ring`` where given."""
        if method == INFER:
            arrival = time.perf_counter_ns()
            try:
                result = self.service.infer_wire(payload, arrival)
            except Exception as exc:  # reported to the client (and logged when unexpected)
                out.send(call, *_failure(exc, method))
                return
            if isinstance(result, InferResponse):
                _answer(out, ring, call, encode_infer_response_wire(result))
                return
            # Batched requests are futures already; other awaitables become a task.
            pending = asyncio.ensure_future(result)
            if pending is not result:
                self._keep(pending)
            pending.add_done_callback(partial(_answer_when_done, out, ring, call))
            return
        self._keep(
            asyncio.ensure_future(self._finish(out, call, method, self._unary(method, payload)))
        )

    def hello(self, payload: bytes | memoryview, out: Coalescer) -> CoreRing | None:
        """A worker is serving: note its private port; the ring it names, if any, sends its
        releases on this connection."""
        words = bytes(payload).split()
        port = int(words[0]) if words else 0
        if port:
            self.private_ports.append(port)
        self._hello.put_nowait(port)
        ring = self._rings.get(int(words[1])) if len(words) > 1 else None
        if ring is not None:
            ring.attach(out, asyncio.get_running_loop())
        return ring

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a task until it is done (the event loop keeps only weak references)."""
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def warm_workers(self, rounds: int = 2) -> None:
        """Send each served version's warm-up request through every worker, over gRPC, before
        the server reports ready: a worker's first call of a kind otherwise pays for
        first-time work in gRPC, the worker and the relay (a first large request took 1.8x
        the steady latency). Failures are logged; they do not stop the start."""
        versions = [v for v in self.core.served_versions() if v.warmup_inputs]
        if not versions:
            return
        started = time.perf_counter()
        wires = [warmup_request(v).SerializeToString() for v in versions]
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        for port in list(self.private_ports):
            try:
                async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=options
                ) as channel:
                    infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
                    headers = self.restricted.headers_for("inference")
                    for wire in wires:
                        for _ in range(rounds):
                            await asyncio.wait_for(infer(wire, metadata=headers), timeout=60)
            except (grpc.RpcError, TimeoutError, OSError) as exc:
                log.warning("gRPC worker on port %d: warm-up failed: %s", port, exc)
        log.info(
            "gRPC workers warmed: %d requests through each of %d in %.2f s",
            rounds * len(wires),
            len(self.private_ports),
            time.perf_counter() - started,
        )

    async def _unary(self, method: int, payload: bytes | memoryview) -> Any:
        name = METHODS[method]
        return await getattr(self.service, name)(REQUESTS[name].FromString(payload), RelayContext())

    async def _finish(self, out: Coalescer, call: int, method: int, work: Awaitable[Any]) -> None:
        try:
            answer = (await work).SerializeToString()
        except Exception as exc:  # a broken call must not end the connection
            out.send(call, *_failure(exc, method))
            return
        out.send(call, 0, answer)

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
        if self.ring_size:
            traffic = list(self._retired_traffic)
            for ring in self._rings.values():
                traffic = [a + b for a, b in zip(traffic, ring.traffic)]
            log.info(
                "gRPC relay: %d requests (%.1f MB) and %d answers (%.1f MB) came through the "
                "workers' shared-memory rings",
                traffic[0],
                traffic[1] / 1e6,
                traffic[2],
                traffic[3] / 1e6,
            )
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self._folder)
