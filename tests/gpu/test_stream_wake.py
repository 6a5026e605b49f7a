"""The stream waker: a pipe that CUDA makes readable once a stream's earlier work has run
(skipped without a GPU)."""

from __future__ import annotations

import select
import time

import pytest

from enginehouse.backends.stream_wake import stream_waker

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _readable(fd: int, timeout_s: float) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


def test_the_pipe_is_readable_only_after_the_work_before_the_wake_up() -> None:
    stream = torch.cuda.Stream()
    waker = stream_waker(stream.cuda_stream)
    assert waker is not None, "libcuda and the C library are there on a GPU host"
    done = torch.cuda.Event()
    try:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000_000)  # a kernel that spins for about 0.1 s
            done.record(stream)
        ticket = waker.arm()
        assert not _readable(waker.fileno(), 0.01), "woken before the kernel ended"
        assert _readable(waker.fileno(), 10.0)
        assert done.query(), "the wake-up came before the work ahead of it was done"
        waker.drain()
        assert waker.received == ticket == 1
        # Wake-ups are counted: two armed, two arrive.
        for _ in range(2):
            waker.arm()
        deadline = time.monotonic() + 10
        while waker.received < 3 and time.monotonic() < deadline:
            _readable(waker.fileno(), 1.0)
            waker.drain()
        assert waker.received == 3
    finally:
        stream.synchronize()
        waker.close()
