"""What every CUDA-graph engine of the process shares, and what it reads from a config
before it captures: one setup lock, cuBLAS's workspace cache and its lock, the streams of
closed engines, the batch buckets and the inputs' shapes and dtypes (cuda_graphs.py is the
engine itself).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes

# One compile or capture at a time in the process: a device-wide synchronisation or a
# compile in one thread invalidates a capture running in another. Replays and copies of
# instances already serving go on meanwhile.
SETUP_LOCK = threading.RLock()
# Held while cuBLAS's workspace cache is dropped (before and after each capture) and while
# an execution runs outside a graph: that cache is one map for the process, which another
# thread's cuBLAS call must not read while it is being cleared.
CUBLAS_CACHE_LOCK = threading.Lock()


# Streams of closed engines, by device, for the next engine. cuBLAS keeps a workspace per
# stream for the life of the process, so new streams on every load would leak device memory.
_FREE_STREAMS: dict[Any, list[Any]] = {}


def take_stream(torch: Any, device: Any) -> Any:
    """A stream on ``device``: one a closed engine gave back, else a new one."""
    with SETUP_LOCK:
        free = _FREE_STREAMS.get(device)
        return free.pop() if free else torch.cuda.Stream(device)


def give_back_stream(device: Any, stream: Any) -> None:
    """Keep a closed engine's stream for the next engine on ``device``."""
    with SETUP_LOCK:
        _FREE_STREAMS.setdefault(device, []).append(stream)


@contextlib.contextmanager
def captured_cublas_workspace(torch: Any) -> Iterator[None]:
    """Around one graph's capture: cuBLAS's cached workspaces are dropped before it, so that
    the captured calls allocate theirs from the graph's own memory pool, and again after it,
    so that no call outside the graph finds that memory still cached (PyTorch's CUDA-graph
    trees do the same). Torch 2.11 caches one workspace per cuBLAS handle and stream, and an
    engine's stream outlives it (``take_stream``): without this, a model's second load on
    the first load's streams ran a kernel that never ended (an H200: hung in 2 of 3 runs, and
    in 3 of 6 before), and passed 7 of 7 with it (``test_unload_returns_device_memory`` in
    tests/gpu)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        with CUBLAS_CACHE_LOCK:
            clear()
    try:
        yield
    finally:
        if clear is not None:
            with CUBLAS_CACHE_LOCK:
                clear()


def default_buckets(max_batch_size: int, preferred: Sequence[int] = ()) -> list[int]:
    """1, 2, 4, 8, then steps of a quarter of the power of two below (12, 16, 20, 24, 28, 32,
    40, 48, ...), up to the max batch size, plus it and the preferred sizes.

    A batch runs padded to the next bucket. With powers of two alone a batch of 33 ran as 64,
    and the engine spent almost half its time on padding whenever the batcher formed batches
    just past a power of two; quarter steps keep the padding under a fifth from 16 rows up
    (a third below). The graphs share one memory pool: their intermediates reuse the same
    device memory."""
    sizes = {max_batch_size, *(p for p in preferred if 0 < p <= max_batch_size)}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        power = 1 << (size.bit_length() - 1)
        size = size * 2 if size < 8 else size + max(4, power // 4)
    return sorted(sizes)


def input_specs(torch: Any, config: mc.ModelConfig) -> list[tuple[tuple[int, ...], Any]]:
    """(dims the engine sees, after any reshape, and torch dtype) of every input."""
    return [
        (
            tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims),
            torch.from_numpy(np.empty(0, datatypes.BY_CONFIG[t.data_type].numpy)).dtype,
        )
        for t in config.input
    ]
