"""Cutting relay frames out of a socket with as few copies as the frame sizes allow.

Small frames (most calls) arrive many to a read: they are read into one reusable buffer and
each payload is copied out once. A large frame (an image batch is megabytes) would otherwise
be copied three times on its way in (into the growing buffer, out of it, and once more when
the buffer is compacted), at several hundred microseconds a megabyte of the core's time;
instead it gets a buffer of its own as soon as its header is known, and the socket reads the
rest of it straight into that buffer. The payload handed on is then a view of that buffer,
which nothing else ever writes to, so tensors may keep views of it.
"""

from __future__ import annotations

import asyncio

import numpy as np

from enginehouse.frontends.grpc.frames import HEADER

# Payloads from this size on get a buffer of their own.
LARGE_FRAME = 32 * 1024
# The reusable buffer: dozens of small frames a read, and at most this much of a large
# frame's start to copy out. It must hold a whole small frame and a header.
RECEIVE_BYTES = 128 * 1024


class FrameReceiver(asyncio.BufferedProtocol):
    """A stream of ``u32 length | u32 call | u8 code | payload`` frames; :meth:`frame` gets
    each one. Payloads are ``bytes`` (small frames) or a ``memoryview`` of a buffer that
    belongs to that frame alone (large ones)."""

    def __init__(self) -> None:
        self._buffer = bytearray(RECEIVE_BYTES)
        self._filled = 0
        # The large frame being received: its call, code, buffer and bytes received so far.
        self._large: memoryview | None = None
        self._large_filled = 0
        self._large_call = (0, 0)

    def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
        raise NotImplementedError

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return self._large[self._large_filled :]
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled == len(self._large):
                self._finish_large()
            return
        self._filled += nbytes
        self._cut()

    def _finish_large(self) -> None:
        assert self._large is not None
        payload, self._large = self._large, None
        self.frame(*self._large_call, payload)

    def _cut(self) -> None:
        """Hand on every complete frame in the buffer; keep the start of an incomplete one."""
        buffer = self._buffer
        filled = self._filled
        start = 0
        with memoryview(buffer) as view:
            while filled - start >= HEADER.size:
                length, call, code = HEADER.unpack_from(buffer, start)
                body = start + HEADER.size
                size = length - (HEADER.size - 4)
                if size >= LARGE_FRAME:
                    # Its own buffer from here on: what arrived is copied once, the socket
                    # writes the rest into place.
                    large = np.empty(size, np.uint8).data  # not zeroed: all of it is written
                    have = min(size, filled - body)
                    large[:have] = view[body : body + have]
                    start = body + have
                    self._large, self._large_filled, self._large_call = large, have, (call, code)
                    if have == size:
                        self._finish_large()
                        continue
                    break
                end = body + size
                if end > filled:
                    break
                payload = bytes(view[body:end])
                start = end
                self.frame(call, code, payload)
        if start:
            rest = filled - start
            buffer[:rest] = buffer[start:filled]
            self._filled = rest
