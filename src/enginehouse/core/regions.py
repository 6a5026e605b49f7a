"""One registered shared-memory region: what it holds open, how it is read and written, and
when it may be freed.

A system region (:class:`Region`) is a part of a client's POSIX shared-memory object: its
descriptor, a guarded mapping where regions are mapped, and on a machine with a GPU a mapping
of its own page-locked by the CUDA driver. A CUDA region (:class:`CudaRegion`) is a client's
device allocation opened from its IPC handle. Either is freed only once it is unregistered
and no request's tensor still waits in it (:class:`HeldRegion`). The registry of regions, and
the reading of requests' tensors from them, are in core/shared_memory.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from abc import ABC, abstractmethod
from typing import Any, cast

import numpy as np

from enginehouse.core import cuda_ipc, mapping_guard
from enginehouse.errors import InvalidArgumentError

log = logging.getLogger(__name__)

SYSTEM = "system"
CUDA = "cuda"


class HeldRegion(ABC):
    """What both kinds share: a region is freed (descriptor closed, allocation unmapped)
    only once it is unregistered and no request's input still waits in it, so that a read
    never meets a closed descriptor, or a number the process has since given to another
    file, or unmapped device memory."""

    kind = ""

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        self._holds = 0
        self._closing = False
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds -= 1
            free = self._closing and self._holds == 0
        if free:
            self._free()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            free = self._holds == 0
        if free:
            self._free()

    @abstractmethod
    def _free(self) -> None:
        """Close what the region holds open."""

    @abstractmethod
    def read(self, offset: int, destination: memoryview) -> int:
        """Fill ``destination`` from ``offset`` into the region; the bytes read."""

    @abstractmethod
    def write(self, offset: int, source: memoryview) -> int:
        """Write ``source`` at ``offset`` into the region; the bytes written."""

    @abstractmethod
    def available(self) -> int:
        """The bytes of the region that can be read now."""


class Region(HeldRegion):
    """A registered system region: its object's descriptor and the part of it the name
    covers."""

    kind = SYSTEM

    def __init__(
        self,
        name: str,
        key: str,
        offset: int,
        byte_size: int,
        fd: int,
        mapped: bool = False,
        pinned: bool = False,
    ) -> None:
        super().__init__(name, byte_size)
        self.key = key
        self.offset = offset
        self.fd = fd
        self._mapping: mmap.mmap | None = None
        # The region's bytes in the mapping, where it is mapped; a mapping starts on a
        # page, the region this far into it.
        self._bytes: np.ndarray | None = None
        self._lead = offset % mmap.ALLOCATIONGRANULARITY
        self._guard: mapping_guard.GuardedMapping | None = None
        if mapped:
            self._mapping = mmap.mmap(fd, self._lead + byte_size, offset=offset - self._lead)
            self._guard = mapping_guard.GuardedMapping(self._mapping)
            self._bytes = np.frombuffer(self._mapping, np.uint8, byte_size, self._lead)
        # A mapping of its own, page-locked by the CUDA driver, that GPU engines copy from
        # and nothing on a CPU reads.
        self._pinned_mapping: mmap.mmap | None = None
        self._pinned: cuda_ipc.PageLockedHost | None = None
        if pinned:
            self._pin_pages()

    def _pin_pages(self) -> None:
        """Page-lock the region for GPU engines' copies; left unpinned (read through the
        descriptor, as before) where the driver refuses."""
        length = self._lead + self.byte_size
        mapping: mmap.mmap | None = None
        try:
            mapping = mmap.mmap(self.fd, length, offset=self.offset - self._lead)
            pointer = ctypes.c_char.from_buffer(mapping)
            address = ctypes.addressof(pointer)
            del pointer  # the address stays valid for the mapping's life; the export must go
            self._pinned = cuda_ipc.PageLockedHost(address, length)
        except (OSError, ValueError, cuda_ipc.CudaIpcError) as exc:
            if mapping is not None:
                mapping.close()
            log.info("shared-memory region '%s' is read through its descriptor: %s", self.name, exc)
            return
        self._pinned_mapping = mapping
        log.info("shared-memory region '%s' pinned for GPU models (%d bytes)", self.name, length)

    @property
    def pinned(self) -> bool:
        """Whether GPU engines take inputs from it by DMA (:meth:`copy_to_device`)."""
        return self._pinned is not None

    def copy_to_device(self, offset: int, address: int, size: int, stream: int) -> None:
        """Enqueue a DMA copy of ``size`` bytes from ``offset`` to device ``address`` on
        ``stream`` (the calling thread's context's). Only for a pinned region, whose object's
        size the request was checked against when decoded."""
        if self._pinned is None:
            raise cuda_ipc.CudaIpcError("the region is not page-locked")
        self._pinned.copy_to_device(self._lead + offset, address, size, stream)

    @property
    def mapped(self) -> bool:
        return self._bytes is not None

    def faults(self) -> int:
        """How many accesses through the mapping found the object truncated (the guard
        answered them with zeros); a region that has taken one is refused from then on."""
        return self._guard.faults() if self._guard is not None else 0

    def check_whole(self, tensor: str) -> None:
        """A 400 for ``tensor`` where the region's object was truncated under its mapping
        while a request used it: the bytes read or written since are not the client's."""
        if self._guard is not None and self._guard.faults():
            raise InvalidArgumentError(
                f"'{tensor}': shared-memory region '{self.name}': its object was truncated "
                "while a request used it; unregister the region and register it again"
            )

    def view(self, offset: int, size: int) -> np.ndarray | None:
        """``size`` bytes from ``offset`` in place, read-only, holding the region open until
        the last view of them is gone; None where the region is not mapped. The object's
        size was checked when the request was decoded; a truncation since is the guard's
        (:meth:`check_whole`)."""
        if self._mapping is None:
            return None
        # The views' common base: NumPy's views of views all refer to it, so its end is
        # the end of the last of them (an array's own lifetime is not: a reshape outlives it).
        owner = (ctypes.c_char * size).from_buffer(self._mapping, self._lead + offset)
        view = np.frombuffer(cast(Any, owner), np.uint8)
        view.flags.writeable = False
        self.hold()
        weakref.finalize(owner, self.release)
        return view

    def writable_view(self, offset: int, size: int) -> np.ndarray | None:
        """``size`` bytes from ``offset`` in place for an engine to write an output into,
        held open as :meth:`view`'s; None where the region is not mapped."""
        view = self.view(offset, size)
        if view is not None:
            view.flags.writeable = True
        return view

    def read(self, offset: int, destination: memoryview) -> int:
        """A read into a buffer of the caller's (a GPU engine's staging buffer) goes
        through the descriptor even where the region is mapped, the path measured at least
        as fast on the H200 host: served ResNet-50 from system shared memory ran 16%
        slower with such reads copied out of the mapping, and 7% slower mapped with them
        through the descriptor (the rest of that cost was not found). Only a read in place,
        which copies nothing, gains from the mapping."""
        if not destination.nbytes:
            return 0
        return os.preadv(self.fd, [destination], self.offset + offset)

    def write(self, offset: int, source: memoryview) -> int:
        if self._bytes is None:
            return os.pwrite(self.fd, source, self.offset + offset)
        count = self.within(offset, source.nbytes)
        if count:
            self._bytes[offset : offset + count] = np.frombuffer(source, np.uint8, count)
        return 0 if self.faults() else count

    def within(self, offset: int, size: int) -> int:
        """How many of ``size`` bytes from ``offset`` the object still holds: a mapping is
        never touched past its object's end."""
        return max(0, min(size, self.available() - offset))

    def available(self) -> int:
        """The bytes of the region its object still holds (a client may truncate it)."""
        return max(0, min(self.byte_size, os.fstat(self.fd).st_size - self.offset))

    def _free(self) -> None:
        mapping, self._mapping, self._bytes = self._mapping, None, None
        if self._guard is not None:
            self._guard.close()
        if mapping is not None:
            # The last view's base may still be on its way out (its finalizer is what
            # released the region): then the mapping goes with it, unmapped once unused.
            with contextlib.suppress(BufferError):
                mapping.close()
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.close()
        if self._pinned_mapping is not None:
            self._pinned_mapping.close()
            self._pinned_mapping = None
        os.close(self.fd)


class CudaRegion(HeldRegion):
    """A registered CUDA region: a client's device allocation opened from its IPC handle."""

    kind = CUDA

    def __init__(
        self, name: str, device_id: int, byte_size: int, allocation: cuda_ipc.ImportedAllocation
    ) -> None:
        super().__init__(name, byte_size)
        self.device_id = device_id
        self.allocation = allocation

    def read(self, offset: int, destination: memoryview) -> int:
        self.allocation.read(offset, destination)
        return destination.nbytes

    def write(self, offset: int, source: memoryview) -> int:
        self.allocation.write(offset, source)
        return source.nbytes

    def available(self) -> int:
        return self.byte_size

    def _free(self) -> None:
        self.allocation.close()
