"""Page-locked host memory for a CUDA-graph engine's staging buffers, registered with CUDA
by the engine itself rather than taken from torch's pinned-memory allocator.

Graphs that copied to and from that allocator's buffers hung the next instance's first
synchronisation (two GPU instances of one model, torch 2.11). Each buffer here is an
anonymous mapping of whole pages, registered with ``cudaHostRegister``; the engine releases
them all when it closes, or when its capture fails (no copy may still be using them then).
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import numpy as np


class PageLocked:
    """The page-locked buffers of one engine."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._registered: list[np.ndarray] = []

    def pin(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A CPU tensor of ``shape`` and ``dtype`` on page-locked memory of its own."""
        torch = self._torch
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        pages = -(-max(size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        raw = np.frombuffer(mmap.mmap(-1, pages), np.uint8)
        code = torch.cuda.cudart().cudaHostRegister(raw.ctypes.data, raw.nbytes, 0)
        if int(code) != 0:
            raise RuntimeError(f"cannot page-lock {pages} bytes of staging memory: {code}")
        self._registered.append(raw)
        return torch.from_numpy(raw[:size]).view(dtype).view(shape)

    def release(self) -> None:
        """Unregister every buffer (their pages go once nothing refers to them)."""
        for raw in self._registered:
            self._torch.cuda.cudart().cudaHostUnregister(raw.ctypes.data)
        self._registered.clear()
