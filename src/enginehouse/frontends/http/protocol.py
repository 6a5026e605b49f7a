"""A small HTTP/1.1 server on asyncio and httptools, built for many tiny requests.

General frameworks spend more time per request on routing layers, middleware and header
objects than the models we serve spend computing. This protocol parses with httptools
(the parser uvicorn uses), keeps connections alive, answers pipelined requests in order,
refuses bodies over the limit before reading them, and writes each response with one
``writelines`` call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

from enginehouse.errors import InvalidArgumentError, PayloadTooLargeError
from enginehouse.frontends.http.connections import Connections, Waiting

log = logging.getLogger(__name__)

_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

_monotonic = time.monotonic
# The states as module globals: the request path reads them several times per request.
_NOTHING, _IDLE, _HEADERS, _BODY = Waiting.NOTHING, Waiting.IDLE, Waiting.HEADERS, Waiting.BODY

# Upper bound on pipelined requests parsed ahead of the one being answered.
_MAX_PIPELINED = 32


@dataclass(slots=True)
class HttpRequest:
    """A parsed request: lower-case header names, the whole (decompressed) body."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class HttpResponse:
    """Status, content type, body parts and extra header lines (``Name: value``)."""

    status: int
    body: list[bytes | memoryview]
    content_type: bytes = b"application/json"
    extra_headers: list[bytes] = field(default_factory=list)


Handler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]


class _TooLarge(Exception):
    pass


class _HeadersTooLarge(Exception):
    pass


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise InvalidArgumentError(f"unsupported Content-Encoding '{encoding}'")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgumentError(f"cannot decompress {encoding} body: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLargeError(f"decompressed body is larger than {limit} bytes")
    return data


class HttpProtocol(asyncio.Protocol):
    """One client connection. ``waiting`` and ``deadline`` tell the listener's sweep what
    the connection waits for and until when (see :mod:`connections`)."""

    def __init__(self, handler: Handler, connections: Connections) -> None:
        self._handler = handler
        self._limit = connections.limits.body_bytes
        self._header_limit = connections.limits.header_bytes
        self._body_timeout = connections.limits.body_timeout_s
        self._header_timeout = connections.limits.header_timeout_s
        self._timeouts = connections.timeouts
        self.waiting = _NOTHING
        self.deadline = 0.0
        # Bytes of the headers of the request being read: raw while they arrive, then exact.
        self._head_bytes = 0
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._task: asyncio.Future[None] | None = None
        self._pending: deque[tuple[HttpRequest, bool]] = deque()
        self._busy = False
        self._closed = False
        self._write_ready = asyncio.Event()
        self._write_ready.set()
        self._connections = connections
        self._header_size = 0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if not self._connections.admit(self):
            self._fail(503, b"too many open connections; retry later")
            return
        self._wait_for(_IDLE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._write_ready.set()
        self._connections.discard(self)

    def _wait_for(self, waiting: Waiting) -> None:
        timeout = self._timeouts[waiting]
        if timeout:
            self.waiting = waiting
            self.deadline = _monotonic() + timeout
        else:
            self.waiting = _NOTHING

    def expire(self) -> None:
        """Called by the sweep once the deadline has passed."""
        if self.waiting == _IDLE:
            self.close()
        elif self.waiting == _HEADERS:
            self._fail(408, b"the request headers did not arrive in time")
        elif self.waiting == _BODY:
            self._fail(408, b"the request body stopped arriving")

    def pause_writing(self) -> None:
        self._write_ready.clear()

    def resume_writing(self) -> None:
        self._write_ready.set()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"protocol upgrades are not supported")
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooLarge):
                self._fail(413, f"request body is larger than {self._limit} bytes".encode())
            elif isinstance(exc.__context__, _HeadersTooLarge):
                self._headers_too_large()
            else:
                self._fail(400, b"malformed HTTP request")
            return
        except httptools.HttpParserError:
            self._fail(400, b"malformed HTTP request")
            return
        if self.waiting == _HEADERS:
            # Still inside a request's headers: count them as they come, before the parser
            # has a whole header to hand over (it buffers one of any size).
            self._head_bytes += len(data)
            if self._head_bytes > self._header_limit:
                self._headers_too_large()

    def _headers_too_large(self) -> None:
        self._fail(431, f"request headers are larger than {self._header_limit} bytes".encode())

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._head_bytes = 0
        self._header_size = 0
        timeout = self._header_timeout
        if timeout:
            self.waiting = _HEADERS
            self.deadline = _monotonic() + timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_size += len(url)
        if self._header_size > self._header_limit:
            raise _HeadersTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self._header_limit:
            raise _HeadersTooLarge()
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limit:
            raise _TooLarge()
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if (length and length != "0") or "transfer-encoding" in self._headers:
            self._wait_for(_BODY)
        else:
            self.waiting = _NOTHING

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            raise _TooLarge()
        self._body.append(body)
        if self.waiting == _BODY:
            self.deadline = _monotonic() + self._body_timeout

    def on_message_complete(self) -> None:
        self.waiting = _NOTHING
        url = httptools.parse_url(self._url)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = HttpRequest(
            method=self._parser.get_method().decode("ascii"),
            path=url.path.decode("latin-1"),
            query=url.query.decode("latin-1") if url.query else "",
            headers=self._headers,
            body=body,
        )
        keep_alive = self._parser.should_keep_alive()
        self._pending.append((request, keep_alive))
        if len(self._pending) > _MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
        if not self._busy:
            self._serve_pending()

    # -- dispatch ----------------------------------------------------------------------

    def _serve_pending(self) -> None:
        """Answer queued requests in order; hands over to a task at the first async one."""
        while self._pending and not self._closed:
            request, keep_alive = self._pending.popleft()
            try:
                result = self._run(request)
            except Exception:
                log.exception("HTTP handler failed")
                result = HttpResponse(500, [b'{"error":"internal server error"}'])
            if isinstance(result, HttpResponse):
                self._write(result, keep_alive, request)
                continue
            self._busy = True
            self._task = asyncio.ensure_future(self._finish(result, keep_alive, request))
            return
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()
            if self.waiting == _NOTHING:  # not inside the next request already
                self._wait_for(_IDLE)

    def _run(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        encoding = request.headers.get("content-encoding", "")
        if encoding and request.body:
            try:
                request.body = _decompress(request.body, encoding.lower(), self._limit)
            except (InvalidArgumentError, PayloadTooLargeError) as exc:
                return error_response(exc.http_status, exc.message)
        return self._handler(request)

    async def _finish(
        self, pending: Awaitable[HttpResponse], keep_alive: bool, request: HttpRequest
    ) -> None:
        try:
            response = await pending
        except Exception:
            log.exception("HTTP handler failed")
            response = HttpResponse(500, [b'{"error":"internal server error"}'])
        if not self._write_ready.is_set():
            await self._write_ready.wait()
        self._write(response, keep_alive, request)
        self._busy = False
        self._serve_pending()

    def _write(self, response: HttpResponse, keep_alive: bool, request: HttpRequest) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        body = response.body
        accept = request.headers.get("accept-encoding")
        extra = response.extra_headers
        if accept and body and ("gzip" in accept or "deflate" in accept):
            gzip = "gzip" in accept
            compressor = zlib.compressobj(wbits=(16 + zlib.MAX_WBITS) if gzip else zlib.MAX_WBITS)
            body = [b"".join(compressor.compress(part) for part in body) + compressor.flush()]
            extra = [*extra, b"Content-Encoding: gzip" if gzip else b"Content-Encoding: deflate"]
        length = sum(len(part) for part in body)
        reason = _REASONS.get(response.status, b"Unknown")
        head = [
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            % (response.status, reason, response.content_type, length)
        ]
        for line in extra:
            head.append(line + b"\r\n")
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        transport.writelines([b"".join(head), *body])
        if not keep_alive:
            transport.close()
            self._closed = True

    def _fail(self, status: int, message: bytes) -> None:
        """Answer a request that could not be parsed, and close: framing is lost."""
        if self._transport is None or self._closed:
            return
        body = b'{"error":"' + message.replace(b'"', b"'") + b'"}'
        self._transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(body), body)
        )
        self._transport.close()
        self._closed = True

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()

    @property
    def idle(self) -> bool:
        return not self._busy and not self._pending


def error_response(status: int, message: str) -> HttpResponse:
    """Triton's error body: ``{"error": "..."}``."""
    import orjson

    return HttpResponse(status, [orjson.dumps({"error": message})])
