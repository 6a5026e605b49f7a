"""A gRPC frontend process: takes calls on the shared port and relays them to the core.

Run by :class:`enginehouse.frontends.grpc.relay.GrpcWorkers` as
``python -m enginehouse.frontends.grpc.worker RELAY HOST PORT MAX_MESSAGE_BYTES [RESTRICTED
TLS [FRONTEND [RING_FD RING]]]`` (the restrictions and TLS as JSON; FRONTEND ``native``, the
HTTP/2 layer of ``native.py``, or ``grpcio``; RING_FD the descriptor of the shared-memory
rings the core made for this worker, -1 for none, and RING their number, which the hello
names). Requests and answers of 64 KB and more travel between the worker and the core
through the rings where they have room (ring.py). The shared port speaks TLS when the
server does; the private warm-up port is plain, on loopback only, and restricted alike. Unary
calls travel as they arrived (no protobuf work here); a ModelStreamInfer stream is relayed
as one ModelInfer per message, its answers sent back as they complete, errors in the
response's ``error_message`` as Triton sends them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from enginehouse.frontends.grpc.access import bind, interceptors
from enginehouse.frontends.grpc.frames import (
    HELLO,
    INTERNAL,
    METHODS,
    SERVICE,
    STATUS,
    CallAborted,
    Coalescer,
    varint,
)
from enginehouse.frontends.grpc.options import server_options
from enginehouse.frontends.grpc.receive import FrameReceiver
from enginehouse.frontends.grpc.ring import (
    ANSWER_IN_RING,
    ANSWERS_TAKEN,
    INFER_IN_RING,
    RELEASED,
    THRESHOLD,
    WorkerRing,
)
from enginehouse.frontends.grpc.streams import answer_concurrently, stream_error
from enginehouse.frontends.security import RestrictedApis, TlsSettings
from enginehouse.runtime.memory import freeze_long_lived

if TYPE_CHECKING:
    from enginehouse.frontends.grpc.native import Body

log = logging.getLogger("enginehouse.grpc.worker")
_GONE = (grpc.StatusCode.UNAVAILABLE.value[0], b"the server is stopping")
_INFER = METHODS.index("ModelInfer")


Reply = tuple[int, bytes | memoryview]


class _RelayReceiver(FrameReceiver):
    """The worker's end of the relay socket: frames cut out as they arrive (no stream
    reader's awaits per frame) and handed to the client."""

    def __init__(self) -> None:
        super().__init__()
        self.client: RelayClient | None = None

    def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
        if self.client is not None:
            self.client.received(call, code, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.lost()


class RelayClient:
    """One Unix-socket connection to the core, with calls multiplexed by id. A call's
    answer resolves its future from the socket's callback: a unary call relayed by the
    native frontend costs no task here."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        receiver: _RelayReceiver,
        ring: WorkerRing | None = None,
    ) -> None:
        # This worker's rings, used once the hello has named them to the core (frames arrive
        # in order, so no request placed in them can come before).
        self._made_ring = ring
        self._ring: WorkerRing | None = None
        self._out = Coalescer(transport)
        self._ids = itertools.count(1)
        # Each call's future, and whether it takes the answer's body alone (a failed call
        # then raises CallAborted) rather than (status, body).
        self._pending: dict[int, tuple[asyncio.Future[Any], bool]] = {}
        # Set when the core went away: the worker then stops instead of holding the port.
        self.closed = asyncio.Event()
        receiver.client = self

    @classmethod
    async def connect(cls, path: str, ring: WorkerRing | None = None) -> RelayClient:
        receiver = _RelayReceiver()
        transport, _ = await asyncio.get_running_loop().create_unix_connection(
            lambda: receiver, path
        )
        return cls(transport, receiver, ring)  # type: ignore[arg-type]

    def received(self, call: int, status: int, payload: bytes | memoryview) -> None:
        """One frame from the core: a release of request places, or a call's answer."""
        if call == 0 and status == RELEASED and self._ring is not None:
            self._ring.released(bytes(payload))
            return
        if status == ANSWER_IN_RING and self._ring is not None:
            status, payload = self._answer_in_ring(bytes(payload))
        waiting = self._pending.pop(call, None)
        if waiting is None:
            return
        future, body_only = waiting
        if future.done():
            return
        if not body_only:
            future.set_result((status, payload))
        elif status:
            future.set_exception(CallAborted(STATUS[status], _text(payload)))
        else:
            future.set_result(payload if isinstance(payload, bytes) else [payload])

    def lost(self) -> None:
        log.info("the relay to the core closed; this worker stops")
        self.closed.set()
        pending, self._pending = self._pending, {}
        for future, body_only in pending.values():
            _stopping(future, body_only)

    def send(self, call: int, method: int, payload: bytes | memoryview) -> None:
        self._out.send(call, method, payload)

    def _answer_in_ring(self, place: bytes) -> Reply:
        """An answer the core left in the answer ring: copied out, its place freed."""
        assert self._ring is not None
        try:
            answer, taken = self._ring.answer(place)
        except ValueError as exc:
            return INTERNAL, f"relay: {exc}".encode()
        self.send(0, ANSWERS_TAKEN, taken)
        return 0, answer

    def hello(self, private_port: int) -> None:
        """Tell the core this worker serves (its private port and its rings' number); large
        messages go through the rings from then on."""
        ring = self._made_ring
        named = f" {ring.number}" if ring is not None else ""
        self.send(0, HELLO, f"{private_port}{named}".encode())
        self._ring = ring

    def request(
        self, method: int, payload: bytes | memoryview, body_only: bool = False
    ) -> asyncio.Future[Any]:
        """Send one call; its future gets (status, body), or with ``body_only`` the body
        (bytes, or one memoryview in a list) and CallAborted for a failed call."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            _stopping(future, body_only)
            return future
        call = next(self._ids)
        self._pending[call] = (future, body_only)
        if method == _INFER and len(payload) >= THRESHOLD and self._ring is not None:
            place = self._ring.place(payload)
            if place is not None:
                method, payload = INFER_IN_RING, place
        self.send(call, method, payload)
        return future

    async def call(self, method: int, payload: bytes | memoryview) -> Reply:
        result: Reply = await self.request(method, payload)
        return result


def _stopping(future: asyncio.Future[Any], body_only: bool) -> None:
    """Answer a call the core will never answer: the server is stopping."""
    if future.done():
        return
    if body_only:
        future.set_exception(CallAborted(STATUS[_GONE[0]], _GONE[1].decode()))
    else:
        future.set_result(_GONE)


def _text(payload: bytes | memoryview) -> str:
    return bytes(payload).decode("utf-8", "replace")


def unary(
    relay: RelayClient, method: int
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        status, payload = await relay.call(method, request)
        if status:
            await context.abort(STATUS[status], _text(payload))
        return bytes(payload)

    return handle


def stream(relay: RelayClient) -> Callable[..., AsyncIterator[pb.ModelStreamInferResponse]]:
    infer = METHODS.index("ModelInfer")

    async def answer(message: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        status, payload = await relay.call(infer, message.SerializeToString())
        if status:
            return stream_error(message, _text(payload))
        return pb.ModelStreamInferResponse(
            infer_response=pb.ModelInferResponse.FromString(bytes(payload))
        )

    async def handle(
        requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for response in answer_concurrently(requests, answer, context):
            yield response

    return handle


async def serve(
    relay_path: str,
    host: str,
    port: int,
    max_message_bytes: int,
    restricted: RestrictedApis,
    tls: TlsSettings | None,
    frontend: str = "grpcio",
    ring: tuple[int, int] | None = None,
) -> None:
    """Serve until stopped; ``ring`` is (descriptor, number) of this worker's rings."""
    relay = await RelayClient.connect(relay_path, WorkerRing(*ring) if ring else None)
    if frontend == "native":
        await serve_native(relay, host, port, max_message_bytes, restricted, tls)
        return
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(unary(relay, index))
        for index, name in enumerate(METHODS)
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        stream(relay),
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    server = grpc.aio.server(
        options=server_options(max_message_bytes, reuse_port=True),
        interceptors=interceptors(restricted),
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if bind(server, address, tls) == 0:
        raise OSError(f"cannot bind gRPC port {address}")
    # A loopback port of this worker alone: the shared port hands each connection to any
    # worker, so the core warms every worker's request path through these before ready.
    private = server.add_insecure_port("127.0.0.1:0")
    # What start-up made (grpc, protobuf and their modules) lives as long as the worker: out
    # of the collector's full walks, which otherwise pause calls in flight for tens of ms.
    freeze_long_lived(idle=True)
    await server.start()
    relay.hello(private)
    gone = await _until_stopped(relay)
    await server.stop(0 if gone else 5.0)


class RelayCalls:
    """The native frontend's calls, relayed to the core as they arrived (no protobuf work
    here but an error's message id)."""

    def __init__(self, relay: RelayClient) -> None:
        self._relay = relay

    def unary(self, method: str, payload: bytes | memoryview) -> Awaitable[Body]:
        return self._relay.request(METHODS.index(method), payload, body_only=True)

    def stream_message(self, payload: bytes | memoryview) -> Awaitable[bytes]:
        return self._stream(payload)

    async def _stream(self, payload: bytes | memoryview) -> bytes:
        status, body = await self._relay.call(_INFER, payload)
        if status:
            message = pb.ModelInferRequest.FromString(payload)
            return bytes(stream_error(message, _text(body)).SerializeToString())
        # ModelStreamInferResponse { infer_response (field 2) = the core's ModelInferResponse }
        return b"\x12" + varint(len(body)) + bytes(body)


async def serve_native(
    relay: RelayClient,
    host: str,
    port: int,
    max_message_bytes: int,
    restricted: RestrictedApis,
    tls: TlsSettings | None,
) -> None:
    """The worker's gRPC on the native HTTP/2 layer, its calls relayed to the core."""
    from enginehouse.frontends.grpc.native_server import NativeGrpcServer

    server = NativeGrpcServer(
        RelayCalls(relay), host, port, max_message_bytes, restricted, tls, reuse_port=True
    )
    await server.start()
    private = await server.listen_privately()
    freeze_long_lived(idle=True)
    relay.hello(private)
    await _until_stopped(relay)
    await server.stop(5.0)


async def _until_stopped(relay: RelayClient) -> bool:
    """Until SIGINT or SIGTERM, or the relay to the core closes (then True)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gone = asyncio.create_task(relay.closed.wait())
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), gone], return_when=asyncio.FIRST_COMPLETED
    )
    return gone.done()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s"
    )
    relay_path, host, port, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    restricted = RestrictedApis.from_json(sys.argv[5]) if len(sys.argv) > 5 else RestrictedApis()
    tls = TlsSettings.from_json(sys.argv[6]) if len(sys.argv) > 6 else None
    frontend = sys.argv[7] if len(sys.argv) > 7 else "grpcio"
    ring_fd = int(sys.argv[8]) if len(sys.argv) > 8 else -1
    ring = (ring_fd, int(sys.argv[9])) if ring_fd >= 0 else None
    try:
        import uvloop

        uvloop.run(serve(relay_path, host, port, max_bytes, restricted, tls, frontend, ring))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
