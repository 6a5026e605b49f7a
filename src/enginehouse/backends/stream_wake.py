"""A file descriptor that becomes readable when a CUDA stream reaches a point in its work.

The event loop launches GPU executions and must learn when they end. Polling a CUDA event
at every turn of the loop works, but it keeps the loop turning while the GPU runs: with 16
BERT clients the core spent 198 us of CPU per request polling, against 136-150 us woken
(H100; at 8,000 requests/s, where the loop turns anyway, both cost the same). A thread that
waits on the event would need the GIL back to tell the loop, and under load that wait is up
to the 5 ms switch interval.

So the wake-up is left to CUDA and the C library, without Python: one byte is written into
a stdio buffer on a pipe (``fputc``), and a host function enqueued on the stream behind the
execution (``cuLaunchHostFunc``) is libc's ``fflush`` of that buffer. CUDA calls it on its
own thread once everything before it on the stream has run, the byte reaches the pipe, and
the loop, which watches the pipe's other end, wakes up. ``fflush`` calls no CUDA function
(host functions must not) and takes the FILE's lock, so the loop's ``fputc`` and CUDA's
flush never interleave. Each wake-up is counted: a byte that arrives after its execution
was already seen done (the event is checked first) is not taken for the next one's.

Where the driver or the C library cannot be found, :func:`stream_waker` returns None and the
loop polls instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

log = logging.getLogger(__name__)

_LIBRARIES: tuple[ctypes.CDLL, ctypes.CDLL] | None = None
# Wake-ups left unread before arm() reads them (a pipe holds 64 KiB).
UNREAD_LIMIT = 4096


def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """(libc, libcuda), loaded once; None where either is missing."""
    global _LIBRARIES
    if _LIBRARIES is None:
        try:
            libc = ctypes.CDLL(None)  # the process's own symbols: the C library's
            cuda = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            log.info("CUDA wake-ups unavailable (%s); executions are polled", exc)
            return None
        libc.fdopen.restype = ctypes.c_void_p
        libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
        libc.fputc.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        cuda.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _LIBRARIES = (libc, cuda)
    return _LIBRARIES


class StreamWaker:
    """A pipe whose read end (:meth:`fileno`) gets one byte per :meth:`arm`, once the
    stream has run everything enqueued before that call."""

    def __init__(self, libc: ctypes.CDLL, cuda: ctypes.CDLL, stream_handle: int) -> None:
        self._libc = libc
        self._cuda = cuda
        self._stream = ctypes.c_void_p(stream_handle)
        self._flush = ctypes.cast(libc.fflush, ctypes.c_void_p)
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        file = libc.fdopen(write, b"w")
        if not file:
            os.close(self._read)
            os.close(write)
            raise OSError(ctypes.get_errno(), "fdopen failed")
        self._file = ctypes.c_void_p(file)
        self.armed = 0
        self.received = 0

    def fileno(self) -> int:
        return self._read

    def arm(self) -> int:
        """Enqueue a wake-up behind the stream's work so far; its number, which
        :attr:`received` reaches once it has arrived."""
        if self.armed - self.received >= UNREAD_LIMIT:
            # Executions that the loop found done before their byte arrived leave it unread;
            # a full pipe would block CUDA's flush, and the stream with it.
            self.drain()
        if self._libc.fputc(0x21, self._file) < 0:
            raise OSError("cannot buffer the stream's wake-up byte")
        code = self._cuda.cuLaunchHostFunc(self._stream, self._flush, self._file)
        if code != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {code}")
        self.armed += 1
        return self.armed

    def drain(self) -> None:
        """Count the wake-ups that have arrived."""
        with contextlib.suppress(BlockingIOError):
            self.received += len(os.read(self._read, 4096))

    def close(self) -> None:
        """Close both ends (after the stream's work is done: a pending flush uses them)."""
        if self._file:
            self._libc.fclose(self._file)
            self._file = ctypes.c_void_p(None)
            with contextlib.suppress(OSError):
                os.close(self._read)


def stream_waker(stream_handle: int) -> StreamWaker | None:
    """A waker for the stream (``torch.cuda.Stream.cuda_stream``), or None without one."""
    libraries = _libraries()
    if libraries is None:
        return None
    try:
        return StreamWaker(*libraries, stream_handle)
    except (OSError, AttributeError) as exc:
        log.info("CUDA wake-ups unavailable (%s); executions are polled", exc)
        return None
