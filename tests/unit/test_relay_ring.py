"""The shared-memory ring between a gRPC worker and the core: where the worker's allocator
places requests, and the core's views of them, freed once nothing refers to them."""

from __future__ import annotations

import asyncio
import gc
import os
import struct

import numpy as np
import pytest

from enginehouse.frontends.grpc.frames import Coalescer
from enginehouse.frontends.grpc.ring import (
    PLACE,
    RELEASED,
    CoreRing,
    RingAllocator,
    WorkerRing,
    make_ring,
)


def test_the_allocator_wraps_and_reuses_space_released_in_any_order() -> None:
    ring = RingAllocator(1024)
    a, b, c = ring.allocate(300), ring.allocate(300), ring.allocate(300)
    assert (a, b, c) == (0, 320, 640)  # 64-byte aligned
    assert ring.allocate(200) is None  # 960 + 256 > 1024 and the start is taken
    ring.release(b)  # out of order: a still holds the start
    assert ring.allocate(200) is None
    ring.release(a)  # a and b come back: the start is free
    assert ring.allocate(200) == 0  # wrapped
    assert ring.allocate(200) is not None  # 256..512, before c at 640
    assert ring.allocate(200) is None  # 512 + 256 > 640
    assert ring.in_use == 3
    ring.release(c)
    assert ring.in_use == 2
    assert ring.allocate(2048) is None  # never fits
    for offset in (0, 256):
        ring.release(offset)
    assert ring.in_use == 0
    assert ring.allocate(1024) == 0  # empty: the whole ring again


class _Written:
    """A transport that keeps what the core's coalescer writes."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        self.frames.append(b"".join(bytes(p) for p in parts))


def test_the_core_reads_a_request_in_place_and_frees_it_when_unreferenced() -> None:
    fd = make_ring(1 << 20)
    worker = WorkerRing(os.dup(fd), 0)
    core = CoreRing(fd)
    os.close(fd)
    written = _Written()

    async def run() -> None:
        core.attach(Coalescer(written), asyncio.get_running_loop())
        payload = np.arange(100_000, dtype=np.uint8).tobytes()
        place = worker.place(payload)
        assert place is not None
        request = core.request(place)
        assert bytes(request) == payload
        tensor = np.frombuffer(request[1000:2000], np.uint8)  # a view, as the codec makes
        del request
        gc.collect()
        await asyncio.sleep(0.01)
        assert written.frames == []  # the tensor still refers to the place
        assert worker.allocator.in_use == 1
        del tensor
        gc.collect()
        for _ in range(3):
            await asyncio.sleep(0.01)
        assert len(written.frames) == 1
        frame = written.frames[0]
        _, call, code = struct.unpack("!IIB", frame[:9])
        assert (call, code) == (0, RELEASED)
        worker.released(frame[9:])
        assert worker.allocator.in_use == 0

    asyncio.run(run())


def test_the_core_refuses_a_place_outside_the_ring() -> None:
    fd = make_ring(4096)
    core = CoreRing(fd)
    os.close(fd)
    for place in (PLACE.pack(4000, 200), PLACE.pack(0, 0), PLACE.pack(1 << 62, 1), b"short"):
        with pytest.raises(ValueError):
            core.request(place)


def test_answers_go_through_the_second_ring_and_are_freed_by_the_worker() -> None:
    fd = make_ring(1 << 20)
    worker = WorkerRing(os.dup(fd), 0)
    core = CoreRing(fd)
    os.close(fd)
    output = np.arange(200_000, dtype=np.uint8)
    pieces: list[bytes | memoryview] = [b"header", memoryview(output), b"tail"]
    place = core.answer(pieces)
    assert place is not None
    answer, taken = worker.answer(place)
    assert answer == b"header" + output.tobytes() + b"tail"
    # A 1 MiB ring holds five such answers; the sixth waits for the worker's release.
    assert [core.answer(pieces) is not None for _ in range(5)] == [True] * 4 + [False]
    core.answers_taken(taken)  # the first, at the start: the ring wraps there
    assert core.answer(pieces) == PLACE.pack(0, len(answer))
    assert core.answer([b"small"]) is None  # under the threshold: over the socket
    with pytest.raises(ValueError):
        worker.answer(PLACE.pack(1 << 20, 1))
