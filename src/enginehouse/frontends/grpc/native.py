"""gRPC over a small HTTP/2 layer of our own: ``--grpc-frontend native``.

grpcio's asyncio server spends most of a small call in its own machinery (a polling thread,
completion queues, Cython callbacks into the event loop): about 0.3-0.5 ms of CPU per call on
the 2-core machine, against our 20-30 us of request work. This frontend speaks the part of
HTTP/2 that gRPC uses directly on an asyncio transport, as the HTTP frontend speaks HTTP/1.1:
frames cut out of the byte stream, request headers decoded with ``hpack``, responses framed
from fixed header blocks (nothing indexed, so no encoder state), flow control both ways.

What it does: every unary method of GRPCInferenceService, and ModelStreamInfer (bidirectional:
each message answered when done); the restricted APIs (metadata headers); TLS with ALPN h2;
the message size limit; PING, SETTINGS, WINDOW_UPDATE, RST_STREAM, GOAWAY. What it does not:
compressed messages (answered UNIMPLEMENTED), server push (never needed), priorities (ignored).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import grpc
from google.protobuf.message import DecodeError

from enginehouse.errors import EnginehouseError, PermissionDeniedError
from enginehouse.frontends.grpc.access import METHOD_GROUPS
from enginehouse.frontends.grpc.frames import CallAborted
from enginehouse.frontends.grpc.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER,
    HEADERS,
    MAX_HEADER_BLOCK,
    MAX_STREAMS,
    MAX_WINDOW,
    NO_ERROR,
    OK_TRAILERS,
    OUR_MAX_FRAME,
    OUR_SETTINGS,
    PADDED,
    PING,
    PREFACE,
    PREFIX,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    REPLENISH,
    RESPONSE_HEADERS,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RequestHeaders,
    frame,
    status_block,
)

if TYPE_CHECKING:
    from enginehouse.frontends.grpc.native_server import NativeGrpcServer

log = logging.getLogger(__name__)

INFER_METHOD = "ModelInfer"
STREAM_METHOD = "ModelStreamInfer"

# A response message: its bytes, or the pieces that make them up in order (a large one's
# outputs stay in their own memory until the socket takes them).
Body = bytes | list[bytes | memoryview]
# What a call answers with: its response message, now or later.
Answer = Body | Awaitable[Body]


# A DATA frame up to this size goes out as one joined buffer rather than several views.
_JOINED_FRAME_BYTES = 16 << 10


def _bytes(piece: bytes | memoryview) -> memoryview:
    """A flat view of a piece's bytes (a typed array's view counts its elements)."""
    view = memoryview(piece)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Calls(Protocol):
    """What a connection hands its calls to: the service in the core's process, or the relay
    to the core in a gRPC worker process. Errors raise (CallAborted, EnginehouseError,
    DecodeError) and end the call with their status."""

    def unary(self, method: str, payload: bytes | memoryview) -> Answer:
        """The response of a unary method (by name) to its request message's bytes."""

    def stream_message(self, payload: bytes | memoryview) -> Answer:
        """A ModelStreamInferResponse's bytes for one ModelStreamInfer message: an inference
        that fails is the message's error, not the stream's."""


@dataclass(slots=True)
class _Stream:
    """One call: its method, metadata, unparsed message bytes and what waits to be sent."""

    number: int
    method: str
    headers: dict[str, str]
    data: bytearray = field(default_factory=bytearray)
    messages: list[bytes | memoryview] = field(default_factory=list)
    send_window: int = 65535
    # What waits to be sent, in order, as byte views, and how many bytes that is.
    pending: deque[memoryview] = field(default_factory=deque)
    pending_bytes: int = 0
    # Sent after the pending data: the trailers' header block, once the call has ended.
    trailers: bytes | None = None
    headers_sent: bool = False
    remote_closed: bool = False
    answering: int = 0  # stream messages dispatched and not yet answered
    reset: bool = False


class NativeGrpcProtocol(asyncio.Protocol):
    """One HTTP/2 connection carrying gRPC calls."""

    def __init__(self, frontend: NativeGrpcServer) -> None:
        self._frontend = frontend
        self._calls = frontend.calls
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface = False
        self._headers_in = RequestHeaders()
        self._streams: dict[int, _Stream] = {}
        self._block: bytearray | None = None  # a header block awaiting CONTINUATION
        self._block_stream = 0
        self._block_end = False
        self._send_window = 65535
        self._peer_window = 65535  # the peer's initial stream window (its SETTINGS)
        self._peer_max_frame = 16384
        self._consumed = 0
        self._buffered = 0  # request bytes held in streams' buffers, not yet whole messages
        self._last_stream = 0
        self._closing = False
        self._out: list[bytes | memoryview] = []
        self._flush_scheduled = False

    # -- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._frontend.connections.add(self)
        self._send(frame(SETTINGS, 0, 0, OUR_SETTINGS))
        self._send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._frontend.connections.discard(self)
        self._transport = None
        for stream in self._streams.values():
            stream.reset = True
        self._streams.clear()

    def _send(self, data: bytes | memoryview) -> None:
        """Queue bytes; everything queued in one turn of the loop goes in one write."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._out:
            self._transport.writelines(self._out)
        self._out = []

    def _fail(self, code: int, reason: str) -> None:
        log.info("gRPC connection closed: %s", reason)
        self._send(
            frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, code) + reason.encode())
        )
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def goaway(self) -> None:
        """Refuse new calls (shutdown); calls under way finish."""
        self._closing = True
        self._send(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, NO_ERROR)))

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    # -- frames in ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position = 0
        if not self._preface:
            if len(buffer) < len(PREFACE):
                return
            if bytes(buffer[: len(PREFACE)]) != PREFACE:
                self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            self._preface = True
            position = len(PREFACE)
        end = len(buffer)
        view = memoryview(buffer)
        while end - position >= 9:
            high, low, kind, flags, stream = HEADER.unpack_from(buffer, position)
            length = (high << 16) | low
            if length > OUR_MAX_FRAME:
                self._fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                return
            if end - position - 9 < length:
                break
            payload = view[position + 9 : position + 9 + length]
            position += 9 + length
            self._on_frame(kind, flags, stream & 0x7FFFFFFF, payload)
            if self._transport is None:
                return
        if position:
            # A new buffer for the rest: views of this one (frames being handled) may live on.
            self._buffer = buffer[position:]

    def _on_frame(self, kind: int, flags: int, stream: int, payload: memoryview) -> None:
        if self._block is not None and kind != CONTINUATION:
            self._fail(PROTOCOL_ERROR, "a header block was interrupted")
            return
        if kind == DATA:
            self._data(flags, stream, payload)
        elif kind == HEADERS:
            self._headers(flags, stream, payload)
        elif kind == CONTINUATION:
            if self._block is None or stream != self._block_stream:
                self._fail(PROTOCOL_ERROR, "CONTINUATION without a header block")
                return
            self._block += payload
            if len(self._block) > MAX_HEADER_BLOCK:
                self._fail(ENHANCE_YOUR_CALM, "a header block over 64 KiB")
                return
            if flags & END_HEADERS:
                block, self._block = bytes(self._block), None
                self._headers_done(self._block_stream, block, self._block_end)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif kind == PING:
            if not flags & ACK:
                self._send(frame(PING, ACK, 0, bytes(payload)))
        elif kind == RST_STREAM:
            found = self._streams.pop(stream, None)
            if found is not None:
                found.reset = True
                self._release(found)
        elif kind == GOAWAY:
            self._closing = True
        elif kind == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored, as the protocol allows.

    def _settings(self, payload: memoryview) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == 4:  # INITIAL_WINDOW_SIZE: moves every open stream's window
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "initial window too large")
                    return
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == 5:
                self._peer_max_frame = max(16384, min(value, (1 << 24) - 1))
        self._send(frame(SETTINGS, ACK, 0))
        self._drain_all()

    def _window_update(self, stream: int, payload: memoryview) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
            return
        increment = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
        if stream == 0:
            self._send_window += increment
            self._drain_all()
            return
        found = self._streams.get(stream)
        if found is not None:
            found.send_window += increment
            self._drain(found)

    def _unpad(self, flags: int, payload: memoryview) -> memoryview | None:
        if flags & PADDED:
            if not payload:
                return None
            pad = payload[0]
            if pad >= len(payload):
                return None
            return payload[1 : len(payload) - pad]
        return payload

    def _headers(self, flags: int, stream: int, payload: memoryview) -> None:
        block = self._unpad(flags, payload)
        if block is None:
            self._fail(PROTOCOL_ERROR, "bad padding")
            return
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if not flags & END_HEADERS:
            self._block = bytearray(block)
            self._block_stream = stream
            self._block_end = bool(flags & END_STREAM)
            return
        self._headers_done(stream, bytes(block), bool(flags & END_STREAM))

    def _headers_done(self, number: int, block: bytes, end_stream: bool) -> None:
        try:
            headers = self._headers_in.decode(block)
        except Exception as exc:  # hpack raises several types for a bad block
            self._fail(PROTOCOL_ERROR, f"undecodable headers: {exc}")
            return
        existing = self._streams.get(number)
        if existing is not None:  # trailers from the client end its half of the call
            if end_stream:
                self._remote_end(existing)
            return
        if number <= self._last_stream or number % 2 == 0:
            self._fail(PROTOCOL_ERROR, f"stream {number} opened out of order")
            return
        self._last_stream = number
        if len(self._streams) >= MAX_STREAMS:
            self._send(frame(RST_STREAM, 0, number, struct.pack(">I", REFUSED_STREAM)))
            return
        path = headers.get(":path", "")
        stream = _Stream(number, path[len(PREFIX) :], headers, send_window=self._peer_window)
        self._streams[number] = stream
        if self._closing:
            self._finish(stream, grpc.StatusCode.UNAVAILABLE, "the server is stopping")
            return
        if not path.startswith(PREFIX) or stream.method not in METHOD_GROUPS:
            self._finish(stream, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}")
            return
        restricted = self._frontend.restricted
        if restricted:
            try:
                restricted.check(METHOD_GROUPS[stream.method], headers)
            except PermissionDeniedError as exc:
                self._finish(stream, grpc.StatusCode.PERMISSION_DENIED, exc.message)
                return
        if end_stream:
            self._remote_end(stream)

    def _data(self, flags: int, number: int, payload: memoryview) -> None:
        self._consumed += len(payload)
        if self._consumed >= REPLENISH:
            self._send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._consumed)))
            self._consumed = 0
        stream = self._streams.get(number)
        data = self._unpad(flags, payload)
        if stream is None or data is None:
            return  # a stream already answered (an error, a reset) or bad padding
        if stream.trailers is not None:
            return  # answered already (refused): the rest of its request is not read
        stream.data += data
        self._buffered += len(data)
        self._messages(stream)
        if self._buffered > max(4 * self._frontend.max_message_bytes, 1 << 26):
            self._fail(ENHANCE_YOUR_CALM, "more request data buffered than four whole messages")
            return
        if flags & END_STREAM:
            self._remote_end(stream)

    def _messages(self, stream: _Stream) -> None:
        """Cut whole gRPC messages (flag, length, bytes) out of the stream's data."""
        data = stream.data
        limit = self._frontend.max_message_bytes
        while len(data) >= 5:
            compressed = data[0]
            length = int.from_bytes(data[1:5], "big")
            if compressed:
                self._finish(stream, grpc.StatusCode.UNIMPLEMENTED, "compressed messages")
                return
            if length > limit:
                self._finish(
                    stream,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({length} vs. {limit})",
                )
                return
            if len(data) < 5 + length:
                return
            self._buffered -= 5 + length
            if len(data) == 5 + length:
                # The whole buffer is this message (a unary call's, usually): hand it over as
                # a view rather than copying its tensors out once more.
                message: bytes | memoryview = memoryview(data)[5:]
                data = stream.data = bytearray()
            else:
                message = bytes(data[5 : 5 + length])
                del data[: 5 + length]
            if stream.method == STREAM_METHOD:
                self._stream_message(stream, message)
            else:
                stream.messages.append(message)

    def _remote_end(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.trailers is not None:
            return
        if stream.data:
            self._finish(stream, grpc.StatusCode.INTERNAL, "a truncated message")
            return
        if stream.method == STREAM_METHOD:
            if not stream.answering:
                self._finish(stream, grpc.StatusCode.OK, "")
            return
        if len(stream.messages) != 1:
            self._finish(
                stream,
                grpc.StatusCode.INTERNAL,
                f"a unary call needs one message, got {len(stream.messages)}",
            )
            return
        self._unary(stream, stream.messages.pop())

    # -- calls -------------------------------------------------------------------------

    def _unary(self, stream: _Stream, payload: bytes | memoryview) -> None:
        try:
            result = self._calls.unary(stream.method, payload)
        except Exception as exc:  # answered with the status it maps to
            self._finish(stream, *status_of(exc, stream.method))
            return
        if isinstance(result, bytes | list):
            self._answer(stream, result, end=True)
            return
        pending = asyncio.ensure_future(result)
        self._frontend.keep(pending)
        pending.add_done_callback(partial(self._unary_done, stream))

    def _unary_done(self, stream: _Stream, future: asyncio.Future[Body]) -> None:
        if future.cancelled():
            self._finish(stream, grpc.StatusCode.CANCELLED, "the request was cancelled")
            return
        error = future.exception()
        if error is not None:
            self._finish(stream, *status_of(error, stream.method))
            return
        self._answer(stream, future.result(), end=True)

    def _stream_message(self, stream: _Stream, payload: bytes | memoryview) -> None:
        stream.answering += 1
        try:
            result = self._calls.stream_message(payload)
        except Exception as exc:  # the stream ends with the status it maps to
            stream.answering -= 1
            self._finish(stream, *status_of(exc, INFER_METHOD))
            return
        if isinstance(result, bytes | list):
            self._stream_answered(stream, result)
            return
        pending = asyncio.ensure_future(result)
        self._frontend.keep(pending)
        pending.add_done_callback(partial(self._stream_done, stream))

    def _stream_done(self, stream: _Stream, future: asyncio.Future[Body]) -> None:
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is not None:
            stream.answering -= 1
            self._finish(stream, *status_of(error, INFER_METHOD))
            return
        self._stream_answered(stream, future.result())

    def _stream_answered(self, stream: _Stream, answer: Body) -> None:
        stream.answering -= 1
        self._answer(stream, answer, end=False)
        if stream.remote_closed and not stream.answering:
            self._finish(stream, grpc.StatusCode.OK, "")

    # -- frames out --------------------------------------------------------------------

    def _answer(self, stream: _Stream, body: Body, end: bool) -> None:
        """One response message on the stream; with ``end``, the call's OK trailers after it."""
        if stream.reset or stream.trailers is not None:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self._send(frame(HEADERS, END_HEADERS, stream.number, RESPONSE_HEADERS))
        if isinstance(body, bytes):
            # One piece, the message's prefix joined to it (what most answers are).
            stream.pending.append(memoryview(b"\x00" + len(body).to_bytes(4, "big") + body))
            stream.pending_bytes += 5 + len(body)
        else:
            pieces = [view for view in map(_bytes, body) if view.nbytes]
            length = sum(piece.nbytes for piece in pieces)
            stream.pending.append(memoryview(b"\x00" + length.to_bytes(4, "big")))
            stream.pending.extend(pieces)
            stream.pending_bytes += 5 + length
        if end:
            stream.trailers = OK_TRAILERS
        self._drain(stream)

    def _finish(self, stream: _Stream, code: grpc.StatusCode, message: str) -> None:
        """End the call with a status: trailers after what is pending, or trailers only."""
        if stream.reset or stream.trailers is not None:
            return
        block = OK_TRAILERS if code == grpc.StatusCode.OK else status_block(code, message)
        if not stream.headers_sent:
            stream.headers_sent = True
            stream.trailers = b""
            self._send(
                frame(HEADERS, END_HEADERS | END_STREAM, stream.number, RESPONSE_HEADERS + block)
            )
            self._close_stream(stream)
            return
        stream.trailers = block
        self._drain(stream)

    def _drain(self, stream: _Stream) -> None:
        """Send what the windows allow of a stream's pending data, then its trailers."""
        pending = stream.pending
        while stream.pending_bytes:
            allowed = min(
                stream.pending_bytes, stream.send_window, self._send_window, self._peer_max_frame
            )
            if allowed <= 0:
                return
            # One DATA frame of the next ``allowed`` bytes: its header, then the views that
            # hold them, joined where they are small, else as they are (the socket's write
            # takes views without a copy).
            pieces: list[bytes | memoryview] = [
                HEADER.pack(allowed >> 16, allowed & 0xFFFF, DATA, 0, stream.number)
            ]
            left = allowed
            while left:
                piece = pending[0]
                if piece.nbytes <= left:
                    pending.popleft()
                    left -= piece.nbytes
                else:
                    pending[0] = piece[left:]
                    piece = piece[:left]
                    left = 0
                pieces.append(piece)
            if allowed <= _JOINED_FRAME_BYTES:
                self._send(b"".join(pieces))
            else:
                for part in pieces:
                    self._send(part)
            stream.pending_bytes -= allowed
            stream.send_window -= allowed
            self._send_window -= allowed
        if stream.trailers:
            self._send(frame(HEADERS, END_HEADERS | END_STREAM, stream.number, stream.trailers))
            stream.trailers = b""
            self._close_stream(stream)

    def _drain_all(self) -> None:
        for stream in list(self._streams.values()):
            if stream.pending_bytes or stream.trailers:
                self._drain(stream)

    def _release(self, stream: _Stream) -> None:
        self._buffered -= len(stream.data)
        stream.data.clear()

    def _close_stream(self, stream: _Stream) -> None:
        self._streams.pop(stream.number, None)
        self._release(stream)
        if not stream.remote_closed:
            # The call is over for the server: the client's remaining half is not wanted.
            self._send(frame(RST_STREAM, 0, stream.number, struct.pack(">I", NO_ERROR)))


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised ``exc`` ends with."""
    if isinstance(exc, CallAborted):
        return exc.code, exc.details
    if isinstance(exc, EnginehouseError):
        return exc.grpc_code, exc.message
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method}Request: {exc}"
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    log.error("gRPC call %s failed", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {exc}"
