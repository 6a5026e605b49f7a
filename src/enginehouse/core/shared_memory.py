"""Triton's system shared-memory extension: regions a client registers, tensors read from
and written to them instead of travelling in the request and the response.

A client makes a POSIX shared-memory object (``shm_open``: a file under /dev/shm), and
registers a part of it (key, offset, byte size) under a name; requests then name the region,
an offset into it and a byte size for an input or a requested output. The server opens the
object once, at registration, and keeps the descriptor; it never maps it. Inputs are read
with ``preadv`` straight into the array the engine reads, outputs written with ``pwrite``:
one copy each way, and no access that a client could turn into a fault (a mapping read after
the client truncated its object would kill the server with SIGBUS; a read of a truncated
file just comes back short, which is a 400 for that request). Only names under /dev/shm are
opened, without following links: a key is one path component.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from enginehouse import datatypes
from enginehouse.errors import (
    EnginehouseError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from enginehouse.messages import SharedMemoryTarget

SHM_ROOT = "/dev/shm"
# At most this many regions at once: each holds an open descriptor.
MAX_REGIONS = 1024
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,255}")


@dataclass(slots=True)
class Region:
    """A registered region: its object's descriptor and the part of it the name covers."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int


def _integer(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class SystemSharedMemory:
    """The system shared-memory regions registered with this server, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        """Open ``key`` (a shm_open name) and register ``byte_size`` bytes of it from
        ``offset`` as ``name``; a 400 naming the problem otherwise (the values come from a
        client as they are and are checked here)."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("a shared-memory region needs a name")
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidArgumentError(
                f"shared-memory key {key!r} is not a shared-memory object name "
                "(one path component, as shm_open takes it: '/name')"
            )
        offset = _integer(offset, "offset")
        byte_size = _integer(byte_size, "byte_size", 1)
        if name in self._regions:
            raise InvalidArgumentError(f"shared-memory region '{name}' is already registered")
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidArgumentError(
                f"{MAX_REGIONS} shared-memory regions are registered, the most this server "
                "holds; unregister some first"
            )
        path = os.path.join(SHM_ROOT, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgumentError(
                f"shared-memory region '{name}': cannot open key {key!r}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(
                    f"shared-memory region '{name}': key {key!r} is not a shared-memory object"
                )
            if info.st_size < offset + byte_size:
                raise InvalidArgumentError(
                    f"shared-memory region '{name}': key {key!r} holds {info.st_size} bytes, "
                    f"fewer than offset {offset} + byte_size {byte_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str = "") -> None:
        """Forget one region, or every region when ``name`` is empty. Requests already
        decoded have their inputs; an output bound for a region unregistered meanwhile
        fails that request."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str = "") -> list[Region]:
        """One region (404 when unknown) or every region."""
        if not name:
            return list(self._regions.values())
        return [self._region(name, NotFoundError)]

    def close(self) -> None:
        self.unregister()

    def _region(self, name: Any, missing: type[EnginehouseError] = InvalidArgumentError) -> Region:
        """The region registered as ``name``; a request naming an unknown one is a bad
        request (400), a status asked of one is a 404."""
        region = self._regions.get(name) if isinstance(name, str) else None
        if region is None:
            raise missing(f"unable to find system shared memory region: '{name}'")
        return region

    def _slice(self, parameters: Mapping[str, Any], tensor: str) -> tuple[Region, int, int]:
        """The region, offset and byte size a tensor's parameters name, checked against the
        region's bounds."""
        if "shared_memory_byte_size" not in parameters:
            raise InvalidArgumentError(
                f"'{tensor}': shared_memory_region needs shared_memory_byte_size as well"
            )
        region = self._region(parameters["shared_memory_region"])
        offset = _integer(parameters.get("shared_memory_offset", 0), f"'{tensor}': offset")
        size = _integer(parameters["shared_memory_byte_size"], f"'{tensor}': byte size")
        if offset + size > region.byte_size:
            raise InvalidArgumentError(
                f"'{tensor}': offset {offset} + byte size {size} runs past shared-memory "
                f"region '{region.name}' ({region.byte_size} bytes)"
            )
        return region, offset, size

    def read_input(
        self,
        parameters: Mapping[str, Any],
        dtype: datatypes.DataType,
        shape: tuple[int, ...],
        tensor: str,
    ) -> np.ndarray:
        """The input tensor the parameters place in a region, read into an array of its own."""
        region, offset, size = self._slice(parameters, tensor)
        if dtype.name != "BYTES":
            needed = datatypes.element_count(shape, tensor) * dtype.itemsize
            if size != needed:
                raise InvalidArgumentError(
                    f"input '{tensor}': shape {list(shape)} of {dtype.name} is {needed} bytes, "
                    f"shared_memory_byte_size says {size}"
                )
        buffer = np.empty(size, np.uint8)  # not zero-filled: the read fills it
        view = memoryview(cast(Any, buffer))
        read = os.preadv(region.fd, [view], region.offset + offset) if size else 0
        if read != size:
            raise InvalidArgumentError(
                f"input '{tensor}': shared-memory region '{region.name}' gave {read} of "
                f"{size} bytes (its object was truncated)"
            )
        return datatypes.from_wire_bytes(view, dtype, shape, tensor)

    def target(self, parameters: Mapping[str, Any], tensor: str) -> SharedMemoryTarget:
        """Where a requested output goes, checked now (an unknown region fails the request
        before it runs)."""
        region, offset, size = self._slice(parameters, tensor)
        return SharedMemoryTarget(region.name, offset, size)

    def write(self, target: SharedMemoryTarget, array: np.ndarray, tensor: str) -> int:
        """Write an output into its region; the bytes written."""
        region = self._regions.get(target.region)
        if region is None:
            raise InvalidArgumentError(
                f"output '{tensor}': shared-memory region '{target.region}' was unregistered "
                "while the request ran"
            )
        data = datatypes.wire_view(array)
        if len(data) > target.byte_size:
            raise InvalidArgumentError(
                f"output '{tensor}' is {len(data)} bytes, more than the {target.byte_size} "
                f"bytes given in shared-memory region '{target.region}'"
            )
        written = os.pwrite(region.fd, data, region.offset + target.offset)
        if written != len(data):
            raise InvalidArgumentError(
                f"output '{tensor}': only {written} of {len(data)} bytes reached "
                f"shared-memory region '{target.region}'"
            )
        return written


def served_regions(regions: SystemSharedMemory | None) -> SystemSharedMemory:
    """The regions a decoder reads shared-memory tensors from; a decoder given none (a
    warm-up, a fuzz run) refuses such tensors."""
    if regions is None:
        raise UnsupportedError("shared-memory tensors are not served on this endpoint")
    return regions
