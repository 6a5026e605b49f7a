"""Large host copies on several threads: requests' inputs into an engine's pinned staging.

One CPU thread copies a large array at 5-6 GB/s on the H200 host (cache misses, not the
memory bus, are its limit), while a page-locked host-to-device transfer runs at 50+ GB/s:
for a batch of images the copy into the staging buffer, not the bus, is the cost. NumPy
releases the GIL while it copies plain arrays, so a copy split into row ranges runs on that
many cores at once. Small copies stay on the calling thread: handing work to a thread costs
tens of microseconds.

Large copies of contiguous arrays go through ``_staging`` (compiled, optional), whose
streaming stores skip reading each destination line into the cache: what lands in a staging
buffer is read next by the GPU, not the CPU. A destination of another dtype than its source is
an FP16 staging buffer for FP32 rows (see cuda_graphs.py): those rows are converted on the way
(F16C, without the GIL).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType

import numpy as np

from enginehouse.messages import RegionTensor, Tensor

_staging: ModuleType | None
try:
    import enginehouse.backends._staging as _staging
except ImportError:  # built without a C compiler
    _staging = None

# Whether FP32 inputs can be staged as FP16: the conversion is built and this CPU runs it.
HALF_STAGING = _staging is not None and bool(_staging.half_available())
# From this size a same-dtype copy of contiguous arrays streams its stores (``_staging``);
# below it the call's own cost is the larger part and the destination may as well stay cached.
STREAM_BYTES = 64 << 10

# Below this many bytes a copy stays on the calling thread.
PARALLEL_BYTES = 4 << 20
# Each thread copies at least this many bytes.
CHUNK_BYTES = 2 << 20
_MAX_THREADS = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


# Half the cores, at most 8. Counted once: os.cpu_count() reads a file under /sys on every
# call, which at once per copy was a tenth of the event loop's time under served BERT.
_DEFAULT_THREADS = max(1, min(_MAX_THREADS, (os.cpu_count() or 1) // 2))


def _threads() -> int:
    """Half the cores, at most 8; ``ENGINEHOUSE_HOST_COPY_THREADS`` sets it (1: copy on the
    calling thread only, as an operator may want where the cores are spoken for)."""
    configured = os.environ.get("ENGINEHOUSE_HOST_COPY_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return _DEFAULT_THREADS


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads() - 1, thread_name_prefix="host-copy")
        return _pool


def _copy(destination: np.ndarray, source: Tensor, streamed: bool = True) -> None:
    """One copy: an array's elements, or a region tensor's bytes read into place; FP32 rows
    into an FP16 destination converted. ``streamed``: the destination is read next by the
    GPU (a staging buffer), not by this CPU, and large copies may bypass the cache."""
    if destination.dtype != source.dtype:
        _to_half(destination, source)
    elif isinstance(source, RegionTensor):
        source.read_into(destination)
    elif (
        streamed
        and _staging is not None
        and destination.nbytes >= STREAM_BYTES
        and destination.shape == source.shape
        and destination.flags.c_contiguous
        and source.flags.c_contiguous
    ):
        _staging.copy(destination, source)
    else:
        np.copyto(destination, source, casting="no")


def _to_half(destination: np.ndarray, source: Tensor) -> None:
    if _staging is None or destination.dtype != np.float16 or source.dtype != np.float32:
        raise TypeError(f"cannot stage {source.dtype} rows in a {destination.dtype} buffer")
    if isinstance(source, RegionTensor):
        read = np.empty(source.shape, source.dtype)
        source.read_into(read)
        source = read
    _staging.to_half(destination, np.ascontiguousarray(source))


def _rows(source: Tensor, start: int, stop: int) -> Tensor:
    return source.rows(start, stop) if isinstance(source, RegionTensor) else source[start:stop]


def copy_rows(destination: np.ndarray, source: Tensor, streamed: bool = True) -> None:
    """``np.copyto(destination, source, casting="no")`` (or a region tensor read into
    ``destination``), split into row ranges copied in parallel when the copy is large and
    the machine has the cores; ``streamed`` as for :func:`_copy`."""
    size = destination.nbytes
    rows = destination.shape[0] if destination.ndim else 0
    if size < PARALLEL_BYTES or rows < 2:
        _copy(destination, source, streamed)
        return
    threads = _threads()
    if threads < 2:
        _copy(destination, source, streamed)
        return
    parts = int(min(threads, rows, max(2, size // CHUNK_BYTES)))
    bounds = [rows * i // parts for i in range(parts + 1)]
    pool = _executor()
    futures: list[Future[None]] = [
        pool.submit(_copy, destination[a:b], _rows(source, a, b), streamed)
        for a, b in itertools.pairwise(bounds[1:])
    ]
    try:
        _copy(destination[: bounds[1]], _rows(source, 0, bounds[1]), streamed)
    finally:
        for future in futures:
            future.result()


def copy_all(pairs: list[tuple[np.ndarray, Tensor]]) -> None:
    """Many copies at once (a batch's requests into their rows of a staging buffer), spread
    over the threads by bytes when together they are large: each part may be small (one
    image is 588 KB) while the batch is megabytes, copied on the event loop's thread
    otherwise."""
    total = sum(destination.nbytes for destination, _ in pairs)
    if total < PARALLEL_BYTES:  # each part is small too: no thread would take any
        for destination, source in pairs:
            _copy(destination, source)
        return
    threads = _threads()
    if threads < 2 or len(pairs) < 2:
        for destination, source in pairs:
            copy_rows(destination, source)
        return
    groups: list[list[tuple[np.ndarray, Tensor]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for destination, source in sorted(pairs, key=lambda pair: -pair[0].nbytes):
        lightest = loads.index(min(loads))
        groups[lightest].append((destination, source))
        loads[lightest] += destination.nbytes
    pool = _executor()
    futures = [pool.submit(_copy_group, group) for group in groups[1:] if group]
    try:
        _copy_group(groups[0])
    finally:
        for future in futures:
            future.result()


# From this many bytes a batch's copy goes in row ranges (copy_in_row_ranges), at most this
# many, each of at least a quarter of these bytes.
RANGED_BYTES = 8 << 20
RANGES = 4


def copy_in_row_ranges(
    copies: list[tuple[int, np.ndarray, Tensor]],
    rows: int,
    copied_rows: Callable[[int, int], None],
) -> bool:
    """:func:`copy_all` of a batch's parts, each at its first row in its staging buffer
    (``(first, destination rows, source)``), in ranges of the batch's ``rows`` one after the
    other, calling ``copied_rows(start, stop)`` once each range is in place: the caller sends
    that range to the device while the next one is copied, so the batch's host-to-device
    copy runs beside its gather instead of after it. False, copying nothing, where the batch
    is too small for that to gain (below RANGED_BYTES)."""
    total = sum(destination.nbytes for _, destination, _ in copies)
    ranges = int(min(RANGES, rows, total // (RANGED_BYTES // RANGES)))
    if total < RANGED_BYTES or ranges < 2:
        return False
    bounds = [rows * i // ranges for i in range(ranges + 1)]
    for start, stop in itertools.pairwise(bounds):
        part = []
        for first, destination, source in copies:
            a, b = max(first, start) - first, min(first + destination.shape[0], stop) - first
            if a < b:
                part.append((destination[a:b], _rows(source, a, b)))
        copy_all(part)
        copied_rows(start, stop)
    return True


def _copy_group(group: list[tuple[np.ndarray, Tensor]]) -> None:
    for destination, source in group:
        _copy(destination, source)


def copied(source: np.ndarray) -> np.ndarray:
    """A copy of ``source`` of its own (``source.copy()``), made by :func:`copy_rows`: an
    engine's outputs, read next by this CPU (the answer's encoding), so not streamed."""
    out = np.empty_like(source)
    copy_rows(out, source, streamed=False)
    return out
