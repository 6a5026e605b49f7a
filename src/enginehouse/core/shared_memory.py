"""Triton's system and CUDA shared-memory extensions: regions a client registers, tensors
read from and written to them instead of travelling in the request and the response.

System regions: a client makes a POSIX shared-memory object (``shm_open``: a file under
/dev/shm) and registers a part of it (key, offset, byte size) under a name. Only names under
/dev/shm are opened, without following links: a key is one path component. Where regions
are mapped (the default on machines without a GPU: core/data_plane.py says why), the server
maps each one, as Triton does, hands a CPU engine its inputs in place (no copy at all) and
copies outputs into the mapping, or, for large outputs (``HostOutput``), lets the engine
write them there itself (ONNX Runtime's I/O binding: no copy either). On the 2-core machine
a 1 MB read through the descriptor took 57-86 us and a 1 MB write 156-173 us, against 29-51
us for a copy through a mapping.

A mapping is what a client could turn into a crash: a page past its object's end faults with
SIGBUS when touched, and a client may truncate its object at any time. Mapped regions are
therefore guarded (core/mapping_guard.py): a fault inside one is absorbed and counted, the
request that met it fails with a 400, and the region is refused until it is registered
again. Sizes are checked against the object before every access as well (after it, for an
output an engine wrote in place), so a region truncated before a request is a 400 without
a fault. Where the guard could not be
built, or with ``serve --map-shared-memory false``, regions are read with ``preadv`` straight
into the array the engine reads and written with ``pwrite``: one copy each way, and a read
of a truncated object just comes back short, a 400 for that request.

On a machine with a GPU, system regions are also pinned when registered (page-locked by the
CUDA driver, ``serve --pin-shared-memory``): a GPU model's input in one is then copied from
the client's pages to the device by DMA when its batch launches, where it would otherwise be
read on a CPU into the instance's pinned staging buffer first. CPU models read them as
before. The driver holds the pages it locked, so a client truncating its object cannot make
a copy fault; each request is checked against the object's size as before. A client that
shrinks its object and then grows it again while it is registered is read from the pages it
had when it registered them: unregister and register again after resizing.

CUDA regions: a client registers the IPC handle of a device allocation (``cudaMalloc``) and
its device; the server opens it through the driver (core/cuda_ipc.py), bounds every copy by
the size the driver reports for the allocation, and copies inputs out of it and outputs into
it with the driver's copies. A GPU engine on the region's own device copies device to
device instead: inputs into its input buffers (``RegionTensor.copy_to_device``), outputs
from its output buffers (``DeviceOutput``), so those bytes never cross to the host.

Requests name a region, an offset into it and a byte size for an input or a requested
output; names are one namespace over both kinds, as in Triton. This module is the registry of
regions and the reading and writing of requests' tensors through them; one region's own
state (its descriptor, mappings, pinning, and when it may be freed) is in core/regions.py.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np

from enginehouse import datatypes
from enginehouse.core import cuda_ipc, mapping_guard
from enginehouse.core.regions import SYSTEM, CudaRegion, Region
from enginehouse.errors import (
    EnginehouseError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from enginehouse.messages import (
    ANY_DEVICE,
    DeviceOutput,
    HostOutput,
    RegionTensor,
    SharedMemoryTarget,
    Tensor,
)

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
# At most this many regions at once: each holds an open descriptor or a device mapping.
MAX_REGIONS = 1024
# Outputs in mapped regions at least this large are offered to the engine to write in place.
# Binding an output costs ONNX Runtime about 7 us a run on the 2-core machine, and saves a
# copy: 30 us for 1 MB from cache, more from memory; under 128 KiB the copy is the cheaper.
IN_PLACE_OUTPUT_BYTES = 128 << 10
# At most this many bytes of system regions are page-locked at once; regions registered past
# it are read through their descriptors. Locking pins a client's pages in memory (they cannot
# be swapped out), so it is bounded as the number of regions is.
MAX_PINNED_BYTES = 16 << 30
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,255}")


def _integer(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class SharedMemoryRegions:
    """The system and CUDA shared-memory regions registered with this server, by name."""

    def __init__(self, mapped: bool = False, pinned: bool = False) -> None:
        if mapped and not mapping_guard.AVAILABLE:
            raise UnsupportedError(
                "system shared-memory regions can be mapped only with the mapping guard, "
                "which this install lacks (it was built without a C compiler); read them "
                "through their descriptors (--map-shared-memory false)"
            )
        self._regions: dict[str, Region | CudaRegion] = {}
        # Whether system regions are mapped (see the module's docstring).
        self.mapped = mapped
        # Whether system regions are page-locked for GPU engines, up to
        # MAX_PINNED_BYTES of them (see the module's docstring).
        self.pinned = pinned
        self._pinned_bytes = 0

    def __len__(self) -> int:
        return len(self._regions)

    def _check_new(self, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("a shared-memory region needs a name")
        if name in self._regions:
            raise InvalidArgumentError(f"shared-memory region '{name}' is already registered")
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidArgumentError(
                f"{MAX_REGIONS} shared-memory regions are registered, the most this server "
                "holds; unregister some first"
            )

    def register(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        """Open ``key`` (a shm_open name) and register ``byte_size`` bytes of it from
        ``offset`` as ``name``; a 400 naming the problem otherwise (the values come from a
        client as they are and are checked here)."""
        self._check_new(name)
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidArgumentError(
                f"shared-memory key {key!r} is not a shared-memory object name "
                "(one path component, as shm_open takes it: '/name')"
            )
        offset = _integer(offset, "offset")
        byte_size = _integer(byte_size, "byte_size", 1)
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
            pin = self.pinned and self._pinned_bytes + byte_size <= MAX_PINNED_BYTES
            region = Region(name, key, offset, byte_size, fd, self.mapped, pin)
        except BaseException:
            os.close(fd)
            raise
        if region.pinned:
            self._pinned_bytes += byte_size
        self._regions[name] = region

    def register_cuda(self, name: str, raw_handle: Any, device_id: Any, byte_size: Any) -> None:
        """Open a client's device allocation from its IPC handle (the 64 bytes of
        ``cudaIpcMemHandle_t``) on ``device_id`` and register ``byte_size`` bytes of it as
        ``name``; a 400 naming the problem otherwise."""
        self._check_new(name)
        if not isinstance(raw_handle, bytes):
            raise InvalidArgumentError(f"CUDA shared-memory region '{name}' needs a raw_handle")
        device_id = _integer(device_id, "device_id")
        byte_size = _integer(byte_size, "byte_size", 1)
        try:
            allocation = cuda_ipc.ImportedAllocation(raw_handle, device_id)
        except cuda_ipc.CudaIpcError as exc:
            raise InvalidArgumentError(
                f"CUDA shared-memory region '{name}': cannot open the IPC handle on device "
                f"{device_id}: {exc}"
            ) from None
        if byte_size > allocation.size:
            allocation.close()
            raise InvalidArgumentError(
                f"CUDA shared-memory region '{name}': byte_size {byte_size} is more than the "
                f"{allocation.size} bytes of the allocation"
            )
        self._regions[name] = CudaRegion(name, device_id, byte_size, allocation)

    def unregister(self, name: str = "", kind: str = SYSTEM) -> None:
        """Forget one region of ``kind``, or every region of that kind when ``name`` is
        empty. Requests already decoded have their inputs; an output bound for a region
        unregistered meanwhile fails that request."""
        names = [name] if name else [n for n, r in self._regions.items() if r.kind == kind]
        for each in names:
            region = self._regions.get(each)
            if region is not None and region.kind == kind:
                del self._regions[each]
                if isinstance(region, Region) and region.pinned:
                    self._pinned_bytes -= region.byte_size
                region.close()

    def status(self, name: str = "", kind: str = SYSTEM) -> list[Region | CudaRegion]:
        """One region of ``kind`` (404 when unknown) or every region of that kind."""
        if not name:
            return [r for r in self._regions.values() if r.kind == kind]
        region = self._region(name, NotFoundError)
        if region.kind != kind:
            raise NotFoundError(f"unable to find {kind} shared memory region: '{name}'")
        return [region]

    def close(self) -> None:
        for region in self._regions.values():
            region.close()
        self._regions.clear()
        self._pinned_bytes = 0

    def _region(
        self, name: Any, missing: type[EnginehouseError] = InvalidArgumentError
    ) -> Region | CudaRegion:
        """The region registered as ``name``; a request naming an unknown one is a bad
        request (400), a status asked of one is a 404."""
        region = self._regions.get(name) if isinstance(name, str) else None
        if region is None:
            raise missing(f"unable to find shared memory region: '{name}'")
        return region

    def _slice(
        self, parameters: Mapping[str, Any], tensor: str
    ) -> tuple[Region | CudaRegion, int, int]:
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
        in_place: list[Region] | None = None,
    ) -> Tensor:
        """The input tensor the parameters place in a region: a :class:`RegionTensor`, read
        when its batch is gathered, straight into an engine's staging buffer where the
        engine has one, else handed over as an array over the mapping itself where the
        region is mapped (and then added to ``in_place``, whose faults the request checks
        once it has run). BYTES tensors, whose elements must be parsed, are read now into an
        array of their own."""
        region, offset, size = self._slice(parameters, tensor)
        if isinstance(region, Region):
            region.check_whole(tensor)
        if dtype.name == "BYTES":
            buffer = np.empty(size, np.uint8)  # not zero-filled: the read fills it
            view = memoryview(cast(Any, buffer))
            self._read_exactly(region, offset, view, tensor)
            return datatypes.from_wire_bytes(view, dtype, shape, tensor)
        needed = datatypes.element_count(shape, tensor) * dtype.itemsize
        if size != needed:
            raise InvalidArgumentError(
                f"input '{tensor}': shape {list(shape)} of {dtype.name} is {needed} bytes, "
                f"shared_memory_byte_size says {size}"
            )
        if region.available() < offset + size:
            raise self._truncated(region, tensor, region.available() - offset, size)

        def read(at: int, destination: memoryview) -> None:
            self._read_exactly(region, at, destination, tensor)

        region.hold()
        if not isinstance(region, CudaRegion):
            system = region
            device, by_dma = (None, None)
            if system.pinned:
                device, by_dma = ANY_DEVICE, self._dma(system, tensor)
            over_mapping: Callable[[int, tuple[int, ...]], np.ndarray | None] | None = None
            if system.mapped and in_place is not None:
                in_place.append(system)

                def over_mapping(at: int, dims: tuple[int, ...]) -> np.ndarray | None:
                    return self._in_place(system, at, dims, dtype)

            return RegionTensor(
                read,
                offset,
                shape,
                dtype.numpy,
                release=system.release,
                device=device,
                to_device=by_dma,
                in_place=over_mapping,
            )
        allocation = region.allocation

        def to_device(at: int, address: int, size: int, stream: int) -> None:
            try:
                allocation.copy_to_device(at, address, size, stream)
            except cuda_ipc.CudaIpcError as exc:
                raise _refused(region, tensor, exc) from None

        return RegionTensor(
            read,
            offset,
            shape,
            dtype.numpy,
            release=region.release,
            device=region.device_id,
            to_device=to_device,
        )

    @staticmethod
    def _dma(region: Region, tensor: str) -> Callable[[int, int, int, int], None]:
        """A pinned region's copy to a device, a 400 naming the tensor where it fails."""

        def to_device(at: int, address: int, size: int, stream: int) -> None:
            try:
                region.copy_to_device(at, address, size, stream)
            except cuda_ipc.CudaIpcError as exc:
                raise _refused(region, tensor, exc) from None

        return to_device

    @staticmethod
    def _in_place(
        region: Region, offset: int, shape: tuple[int, ...], dtype: datatypes.DataType
    ) -> np.ndarray | None:
        """An input as an array over the mapped region itself; None where it cannot be
        (not aligned for its type: then it is read like any other). The
        mapping starts on a page, so the offset into the object says the alignment."""
        if (region.offset + offset) % dtype.numpy.alignment:
            return None
        view = region.view(offset, math.prod(shape) * dtype.itemsize)
        return None if view is None else view.view(dtype.numpy).reshape(shape)

    def _read_exactly(
        self, region: Region | CudaRegion, offset: int, destination: memoryview, tensor: str
    ) -> None:
        read = self._copy(region, region.read, offset, destination, tensor)
        if read != destination.nbytes:
            raise self._truncated(region, tensor, read, destination.nbytes)

    @staticmethod
    def _truncated(
        region: Region | CudaRegion, tensor: str, got: int, size: int
    ) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"input '{tensor}': shared-memory region '{region.name}' gave {max(0, got)} of "
            f"{size} bytes (its object was truncated)"
        )

    def target(self, parameters: Mapping[str, Any], tensor: str) -> SharedMemoryTarget:
        """Where a requested output goes, checked now (an unknown region fails the request
        before it runs)."""
        region, offset, size = self._slice(parameters, tensor)
        return SharedMemoryTarget(region.name, offset, size)

    def output_targets(
        self, targets: Mapping[str, SharedMemoryTarget], host: bool = True
    ) -> dict[str, DeviceOutput | HostOutput] | None:
        """The targets an engine may write in place: in CUDA regions (a GPU engine on the
        region's device), and, where ``host`` (the model's engines can), of at least
        :data:`IN_PLACE_OUTPUT_BYTES` in mapped system regions; None when there are none.
        Each holds its region open until it is gone, as an input tensor in a region does."""
        found: dict[str, DeviceOutput | HostOutput] = {}
        for tensor, target in targets.items():
            region = self._regions.get(target.region)
            if isinstance(region, CudaRegion):
                found[tensor] = self._device_output(region, target)
            elif (
                host
                and isinstance(region, Region)
                and region.mapped
                and target.byte_size >= IN_PLACE_OUTPUT_BYTES
                and (buffer := region.writable_view(target.offset, target.byte_size)) is not None
            ):
                found[tensor] = HostOutput(region, buffer)
        return found or None

    @staticmethod
    def _device_output(region: CudaRegion, target: SharedMemoryTarget) -> DeviceOutput:
        allocation = region.allocation
        offset = target.offset

        def from_device(source: int, size: int, stream: int) -> bool:
            try:
                allocation.copy_from_device(offset, source, size, stream)
            except cuda_ipc.CudaIpcError:
                return False  # the write from the host says why
            return True

        region.hold()
        return DeviceOutput(region, region.device_id, target.byte_size, from_device, region.release)

    def registered(self, target: SharedMemoryTarget, tensor: str) -> Region | CudaRegion:
        """The region an output's target names, still registered (a 400 when the client
        unregistered it while the request ran)."""
        region = self._regions.get(target.region)
        if region is None:
            raise InvalidArgumentError(
                f"output '{tensor}': shared-memory region '{target.region}' was unregistered "
                "while the request ran"
            )
        return region

    def written_in_place(
        self, target: SharedMemoryTarget, output: DeviceOutput | HostOutput, tensor: str
    ) -> int:
        """The bytes an engine wrote into ``target`` itself; for a mapped region, checked as
        a write through the data plane is: its object still holds them, and was not
        truncated under the mapping meanwhile (else a 400)."""
        region = output.region
        written = output.written or 0
        if isinstance(region, Region):
            region.check_whole(tensor)
            held = region.within(target.offset, written)
            if held != written:
                raise _short_write(tensor, held, written, target)
        return written

    def write(self, target: SharedMemoryTarget, array: np.ndarray, tensor: str) -> int:
        """Write an output into its region; the bytes written."""
        region = self.registered(target, tensor)
        if isinstance(region, Region):
            region.check_whole(tensor)
        data = memoryview(datatypes.wire_view(array))
        if len(data) > target.byte_size:
            raise InvalidArgumentError(
                f"output '{tensor}' is {len(data)} bytes, more than the {target.byte_size} "
                f"bytes given in shared-memory region '{target.region}'"
            )
        written = self._copy(region, region.write, target.offset, data, tensor)
        if written != len(data):
            raise _short_write(tensor, written, len(data), target)
        return written

    @staticmethod
    def _copy(
        region: Region | CudaRegion, copy: Any, offset: int, buffer: memoryview, tensor: str
    ) -> int:
        try:
            return int(copy(offset, buffer))
        except cuda_ipc.CudaIpcError as exc:
            raise _refused(region, tensor, exc) from None


def _short_write(
    tensor: str, written: int, size: int, target: SharedMemoryTarget
) -> InvalidArgumentError:
    """Only part of an output reached its system region: the object was truncated."""
    return InvalidArgumentError(
        f"output '{tensor}': only {written} of {size} bytes reached shared-memory region "
        f"'{target.region}' (its object was truncated)"
    )


def _refused(
    region: Region | CudaRegion, tensor: str, exc: cuda_ipc.CudaIpcError
) -> InvalidArgumentError:
    """A 400 for a copy the CUDA driver refused, naming the tensor and the region."""
    kind = "CUDA" if isinstance(region, CudaRegion) else "system"
    return InvalidArgumentError(f"'{tensor}': {kind} shared-memory region '{region.name}': {exc}")


def region_status(region: Region | CudaRegion) -> dict[str, Any]:
    """A region as the extension's status lists it (the same fields over both protocols)."""
    if isinstance(region, CudaRegion):
        return {"name": region.name, "device_id": region.device_id, "byte_size": region.byte_size}
    return {
        "name": region.name,
        "key": region.key,
        "offset": region.offset,
        "byte_size": region.byte_size,
    }


def decode_raw_handle(value: Any) -> bytes:
    """The handle bytes of an HTTP registration's ``raw_handle`` (``{"b64": ...}``)."""
    encoded = value.get("b64") if isinstance(value, dict) else None
    if not isinstance(encoded, str):
        raise InvalidArgumentError('raw_handle must be an object {"b64": "<base64>"}')
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError("raw_handle.b64 is not base64") from None


def served_regions(regions: SharedMemoryRegions | None) -> SharedMemoryRegions:
    """The regions a decoder reads shared-memory tensors from; a decoder given none (a
    warm-up, a fuzz run) refuses such tensors."""
    if regions is None:
        raise UnsupportedError("shared-memory tensors are not served on this endpoint")
    return regions
