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
    read_frame,
    varint,
)
from enginehouse.frontends.grpc.options import server_options
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

log = logging.getLogger("enginehouse.grpc.worker")
_GONE = (grpc.StatusCode.UNAVAILABLE.value[0], b"the server is stopping")
_INFER = METHODS.index("ModelInfer")


class RelayClient:
    """One Unix-socket connection to the core, with calls multiplexed by id."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ring: WorkerRing | None = None,
    ) -> None:
        self._reader = reader
        # This worker's rings, used once the hello has named them to the core (frames arrive
        # in order, so no request placed in them can come before).
        self._made_ring = ring
        self._ring: WorkerRing | None = None
        self._out = Coalescer(writer)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        # Set when the core went away: the worker then stops instead of holding the port.
        self.closed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                call, status, payload = await read_frame(self._reader)
                if call == 0 and status == RELEASED and self._ring is not None:
                    self._ring.released(payload)
                    continue
                if status == ANSWER_IN_RING and self._ring is not None:
                    status, payload = self._answer_in_ring(payload)
                future = self._pending.pop(call, None)
                if future is not None and not future.done():
                    future.set_result((status, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("the relay to the core closed; this worker stops")
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_result(_GONE)

    def send(self, call: int, method: int, payload: bytes | memoryview) -> None:
        self._out.send(call, method, payload)

    def _answer_in_ring(self, place: bytes) -> tuple[int, bytes]:
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

    async def call(self, method: int, payload: bytes | memoryview) -> tuple[int, bytes]:
        if self.closed.is_set():
            return _GONE
        call = next(self._ids)
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[call] = future
        if method == _INFER and len(payload) >= THRESHOLD and self._ring is not None:
            place = self._ring.place(payload)
            if place is not None:
                method, payload = INFER_IN_RING, place
        self.send(call, method, payload)
        return await future


def unary(
    relay: RelayClient, method: int
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        status, payload = await relay.call(method, request)
        if status:
            await context.abort(STATUS[status], payload.decode("utf-8", "replace"))
        return payload

    return handle


def stream(relay: RelayClient) -> Callable[..., AsyncIterator[pb.ModelStreamInferResponse]]:
    infer = METHODS.index("ModelInfer")

    async def answer(message: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        status, payload = await relay.call(infer, message.SerializeToString())
        if status:
            return stream_error(message, payload.decode("utf-8", "replace"))
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse.FromString(payload))

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
    reader, writer = await asyncio.open_unix_connection(relay_path, limit=max_message_bytes + 64)
    relay = RelayClient(reader, writer, WorkerRing(*ring) if ring else None)
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

    def unary(self, method: str, payload: bytes | memoryview) -> Awaitable[bytes]:
        return self._call(METHODS.index(method), payload)

    async def _call(self, method: int, payload: bytes | memoryview) -> bytes:
        status, body = await self._relay.call(method, payload)
        if status:
            raise CallAborted(STATUS[status], body.decode("utf-8", "replace"))
        return body

    def stream_message(self, payload: bytes | memoryview) -> Awaitable[bytes]:
        return self._stream(payload)

    async def _stream(self, payload: bytes | memoryview) -> bytes:
        status, body = await self._relay.call(_INFER, payload)
        if status:
            message = pb.ModelInferRequest.FromString(payload)
            return bytes(stream_error(message, body.decode("utf-8", "replace")).SerializeToString())
        # ModelStreamInferResponse { infer_response (field 2) = the core's ModelInferResponse }
        return b"\x12" + varint(len(body)) + body


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
