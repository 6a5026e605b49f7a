"""Large requests and answers between a gRPC worker and the core through shared memory, not
the relay socket.

Over the socket a megabyte-sized message costs the core a copy of every byte through the
kernel, in as many reads or writes as the socket's buffer takes to pass it. Instead, the core makes
one shared-memory object per worker (a ``memfd``, inherited by the worker at spawn) holding
two rings of the same size:

- the request ring: the worker copies a request of :data:`THRESHOLD` bytes or more into
  free space and relays only where it lies. The core's tensors are then views of the ring:
  the core copies none of those bytes. Once nothing in the core refers to a request any more
  (its tensors and their views are gone: a finalizer on the buffer that all of them share),
  the core tells the worker the space is free again, several releases to a frame.
- the answer ring: the core writes a large answer's pieces (the outputs' own memory among
  them) into free space, once, and relays where it lies; the worker copies it out for its
  client and frees the space.

Each ring has one writer, whose allocator alone decides where; the reader checks every
place it is given against the ring's bounds. A full ring is not an error: the message then
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

# Messages of this size and more go through the rings.
THRESHOLD = 64 * 1024
# Each of a worker's two rings, unless --grpc-relay-ring-mb says otherwise.
DEFAULT_RING_BYTES = 16 << 20
# Worker -> core: a ModelInfer request in the request ring (payload: its place).
INFER_IN_RING = 254
# Core -> worker, call id 0: places in the request ring are free again (payload: offsets).
RELEASED = 254
# Core -> worker: the call's answer (status OK) is in the answer ring (payload: its place).
ANSWER_IN_RING = 253
# Worker -> core, call id 0: places in the answer ring are free again (payload: offsets).
ANSWERS_TAKEN = 253
PLACE = struct.Struct("!QQ")
_ALIGN = 64


def make_ring(size: int) -> int:
    """A new worker's rings, ``size`` bytes each, as one descriptor (inheritable, for the
    worker the core spawns next)."""
    fd = os.memfd_create("enginehouse-relay-ring", 0)
    try:
        os.ftruncate(fd, 2 * size)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unplace(place: bytes | memoryview, size: int) -> tuple[int, int]:
    """(offset, length) of a place in a ring of ``size`` bytes; ValueError outside it."""
    if len(place) != PLACE.size:
        raise ValueError("a ring place is 16 bytes")
    offset, length = PLACE.unpack(place)
    if length == 0 or offset + length > size:
        raise ValueError(f"{length} bytes at {offset} lie outside the {size}-byte ring")
    return offset, length


def _offsets(offsets: list[int]) -> bytes:
    return struct.pack(f"!{len(offsets)}Q", *offsets)


class RingAllocator:
    """Where a ring's writer puts the next message: contiguous space after the newest one,
    wrapping to the start when the end is taken. Space comes back in any order; it is
    reused once every message placed before it has come back too (a ring's usual rule)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._live: deque[tuple[int, int]] = deque()  # (start, end), oldest first
        self._released: set[int] = set()
        self._head = 0  # where the newest message ends

    @property
    def in_use(self) -> int:
        """Messages placed and not yet released."""
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
        """The reader is done with the message placed at ``offset``."""
        self._released.add(offset)
        live = self._live
        while live and live[0][0] in self._released:
            self._released.discard(live.popleft()[0])
        if not live:
            self._head = 0


class _Writer:
    """The writing side of one ring: where a message goes, written there, freed later."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self.allocator = RingAllocator(len(view))

    def place(self, pieces: list[bytes | memoryview]) -> bytes | None:
        """Copy the concatenation of ``pieces`` into the ring; the frame payload that says
        where (None when the ring has no room for it)."""
        length = sum(len(piece) for piece in pieces)
        offset = self.allocator.allocate(length)
        if offset is None:
            return None
        at = offset
        for piece in pieces:
            self._view[at : at + len(piece)] = piece
            at += len(piece)
        return PLACE.pack(offset, length)

    def released(self, payload: bytes | memoryview) -> None:
        """Free the places a release frame lists."""
        for (offset,) in struct.iter_unpack("!Q", payload):
            self.allocator.release(offset)


class WorkerRing:
    """The worker's side: it writes requests into the first ring and reads answers from
    the second. ``number`` is what the worker's hello names them by."""

    def __init__(self, fd: int, number: int) -> None:
        self.number = number
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)
        view = memoryview(self._map)
        half = len(view) // 2
        self._requests = _Writer(view[:half])
        self._answers = view[half:]

    @property
    def allocator(self) -> RingAllocator:
        return self._requests.allocator

    def place(self, payload: bytes | memoryview) -> bytes | None:
        """The place of a request copied into the request ring (None: no room)."""
        return self._requests.place([payload])

    def released(self, payload: bytes | memoryview) -> None:
        self._requests.released(payload)

    def answer(self, place: bytes | memoryview) -> tuple[bytes, bytes]:
        """The answer at a place in the answer ring, copied out, and the release frame's
        payload that frees the place; ValueError outside the ring."""
        offset, length = _unplace(place, len(self._answers))
        return bytes(self._answers[offset : offset + length]), _offsets([offset])


class CoreRing:
    """The core's side of one worker's rings: requests as views of the first, released once
    they are no longer referenced; answers written into the second."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        view = memoryview(self._map)
        half = len(view) // 2
        self.size = half
        self._answers = _Writer(view[half:])
        # What came through: requests and their bytes, answers and theirs (logged at stop).
        self.traffic = [0, 0, 0, 0]
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
        """The request a frame places in the request ring, as a read-only view; ValueError
        for a place outside it."""
        offset, length = _unplace(place, self.size)
        # Every view of the request (protobuf's cut-outs, the tensors) refers to this array;
        # once the last one is gone the place is free.
        owner = np.frombuffer(self._map, np.uint8, count=length, offset=offset)
        owner.flags.writeable = False
        weakref.finalize(owner, self._release, offset)
        self.traffic[0] += 1
        self.traffic[1] += length
        return owner.data

    def answer(self, body: bytes | list[bytes | memoryview]) -> bytes | None:
        """Write a large answer into the answer ring; the place to relay, or None when it is
        small or finds no room (it then goes over the socket)."""
        length = len(body) if isinstance(body, bytes) else sum(len(piece) for piece in body)
        if length < THRESHOLD:  # most answers: nothing is made for them
            return None
        place = self._answers.place([body] if isinstance(body, bytes) else body)
        if place is not None:
            self.traffic[2] += 1
            self.traffic[3] += length
        return place

    def answers_taken(self, payload: bytes | memoryview) -> None:
        """The worker has copied these answers out (on the event loop's thread)."""
        self._answers.released(payload)

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
            self._out.send(0, RELEASED, _offsets(pending))
