"""The process's memory around loads: giving unloaded models' memory back to the machine,
and keeping what a load leaves behind out of the garbage collector's way.

Closing a session frees its buffers inside the process, but glibc keeps freed heap pages
for reuse and PyTorch's caching allocator keeps freed device blocks, so without
``release_freed_memory`` an unload would not show in RSS or in nvidia-smi.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
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
        from enginehouse.backends.graph_setup import SETUP_LOCK

        # A device-wide synchronisation while another thread captures a graph fails both
        # (seen when one model's load ran out of memory while another captured).
        with SETUP_LOCK:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def freeze_long_lived(idle: bool) -> None:
    """Take the objects that loads left behind out of the cyclic collector's walks.

    A GPU model's load brings in hundreds of thousands of long-lived objects (torch's and
    Inductor's modules, the generated engine, sympy), and every full collection walks all
    of them: a pause of 0.1-0.25 s for whichever requests are in flight, which Python starts
    on its own soon after a load, since it collects fully whenever the long-lived objects
    have grown by a quarter. Frozen objects are never walked again (reference counting
    still frees them). With nothing in flight, a full collection first reclaims garbage
    cycles, those of unloaded versions included; while serving, only the young generations
    are collected, so that this costs no pause.
    """
    if idle:
        gc.unfreeze()
        gc.collect()
    else:
        gc.collect(1)
    gc.freeze()
