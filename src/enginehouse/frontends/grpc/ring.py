"""Large requests from a gRPC worker to the core through shared memory, not the relay socket.

Over the socket a megabyte-sized request costs the core a receive of every byte (the kernel
copies it into the core's buffer) and a dozen turns of the event loop to collect it. Instead,
the core makes one shared-memory ring per worker (a ``memfd``, inherited by the worker at
spawn); the worker copies a request above :data:`THRESHOLD` into free space in its ring and
relays only where it lies. The core's tensors are then views of the ring: the core copies
none of those bytes. Once nothing in the core refers to a request any more (its tensors
and their views are gone: a finalizer on the buffer that all of them share), the core tells
the worker the space is free again, several releases to a frame.

Only the worker writes a ring and only its allocator decides where; the core checks every
place it is given against the ring's bounds. A full ring is not an error: the request then
travels over the socket as before.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the CLI reads the defaults here without importing grpc
    from enginehouse.frontends.grpc.frames import Coalescer

# Requests of this size and more go through the ring.
THRESHOLD = 64 * 1024
# Each worker's ring, unless --grpc-relay-ring-mb says otherwise.
DEFAULT_RING_BYTES = 32 << 20
# Worker -> core: a ModelInfer request in the ring (payload: offset, length).
INFER_IN_RING = 254
# Core -> worker: space in the ring is free again (payload: offsets, call id 0).
RELEASED = 254
PLACE = struct.Struct("!QQ")
_ALIGN = 64


def make_ring(size: int) -> int:
    """A new ring's descriptor (inheritable, for the worker the core spawns next)."""
    fd = os.memfd_create("enginehouse-relay-ring", 0)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class RingAllocator:
    """Where the worker puts the next request: contiguous space after the newest one,
    wrapping to the start when the end is taken. Space comes back in any order; it is
    reused once every request placed before it has come back too (a ring's usual rule)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._live: deque[tuple[int, int]] = deque()  # (start, end), oldest first
        self._released: set[int] = set()
        self._head = 0  # where the newest request ends

    @property
    def in_use(self) -> int:
        """Requests placed and not yet released."""
        return len(self._live) - len(self._released)

    def allocate(self, length: int) -> int | None:
        """The offset of ``length`` free bytes, or None when the ring has no such space."""
        need = -(-length // _ALIGN) * _ALIGN
        if not self._live:
            offset = 0 if need <= self.size else None
        else:
            tail = self._live[0][0]
            if self._head > tail:
                if self.size - self._head >= need:
                    offset = self._head
                elif tail >= need:
                    offset = 0
                else:
                    offset = None
            else:  # wrapped: the free space lies between the newest and the oldest
                offset = self._head if tail - self._head >= need else None
        if offset is None:
            return None
        self._live.append((offset, offset + need))
        self._head = offset + need
        return offset

    def release(self, offset: int) -> None:
        """The core is done with the request placed at ``offset``."""
        self._released.add(offset)
        live = self._live
        while live and live[0][0] in self._released:
            self._released.discard(live.popleft()[0])
        if not live:
            self._head = 0


class WorkerRing:
    """The worker's side: its mapping of the ring and the allocator."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size)
        os.close(fd)
        self._view = memoryview(self._map)
        self.allocator = RingAllocator(size)

    def place(self, payload: bytes | memoryview) -> bytes | None:
        """Copy ``payload`` into the ring; the frame payload that says where (None when the
        ring has no room for it)."""
        length = len(payload)
        offset = self.allocator.allocate(length)
        if offset is None:
            return None
        self._view[offset : offset + length] = payload
        return PLACE.pack(offset, length)

    def released(self, payload: bytes) -> None:
        """Free the places a RELEASED frame lists."""
        for (offset,) in struct.iter_unpack("!Q", payload):
            self.allocator.release(offset)


class CoreRing:
    """The core's side of one worker's ring: requests in it as views, and the releases to
    send back once they are no longer referenced."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self.size = size
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._send: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: Coalescer | None = None

    def attach(self, out: Coalescer, loop: asyncio.AbstractEventLoop) -> None:
        """Send releases on this worker's connection (once its hello names the ring)."""
        self._out = out
        self._loop = loop

    def request(self, place: bytes | memoryview) -> memoryview:
        """The request a frame places in the ring, as a read-only view; ValueError for a
        place outside it."""
        if len(place) != PLACE.size:
            raise ValueError("a ring place is 16 bytes")
        offset, length = PLACE.unpack(place)
        if length == 0 or offset + length > self.size:
            raise ValueError(f"{length} bytes at {offset} lie outside the {self.size}-byte ring")
        # Every view of the request (protobuf's cut-outs, the tensors) refers to this array;
        # once the last one is gone the place is free.
        owner = np.frombuffer(self._map, np.uint8, count=length, offset=offset)
        weakref.finalize(owner, self._release, offset)
        return owner.data

    def _release(self, offset: int) -> None:
        """Called on whatever thread dropped the request's last reference."""
        with self._lock:
            self._pending.append(offset)
            if self._send is not None or self._loop is None:
                return
            try:
                self._send = self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop has closed: the server is stopping
                self._send = None

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._send = None
        if pending and self._out is not None:
            self._out.send(0, RELEASED, struct.pack(f"!{len(pending)}Q", *pending))
