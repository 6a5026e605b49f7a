"""Giving the memory of unloaded models back to the machine.

Closing a session frees its buffers inside the process, but glibc keeps freed heap pages
for reuse and PyTorch's caching allocator keeps freed device blocks, so without this an
unload would not show in RSS or in nvidia-smi. Called off the event loop after unloads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once; None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to trim
    trim.argtypes = [ctypes.c_size_t]
    return trim  # type: ignore[no-any-return]


def release_freed_memory() -> None:
    """Return free heap pages to the OS and empty the CUDA cache.

    No ``gc.collect()``: sessions are freed by reference counting when their version is
    closed, and a full collection would hold the GIL (and stall serving) for milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
