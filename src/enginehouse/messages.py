"""The typed messages that cross the frontend/core boundary and reach the scheduler.

A frontend turns wire bytes into an :class:`InferRequest` and an :class:`InferResponse`
back into bytes; nothing else crosses. Tensors travel by reference as NumPy arrays, views
over the request body where the wire format allows, or as a :class:`RegionTensor` where
they wait in a client's shared-memory region.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

# A RegionTensor's ``device`` where it is in page-locked host memory: every device's engines
# can copy it in (``copy_to_device``), none holds it.
ANY_DEVICE = -1


class RegionTensor:
    """An input tensor left in a client's shared-memory region until its batch is gathered,
    then read once, straight into the buffer the engine reads (a GPU instance's pinned
    staging buffer), or into an array of its own where an engine needs one
    (``np.asarray``). Only what a scheduler and an engine's gather ask of an input is here:
    shape, dtype, sizes, ``reshape`` and a range of rows.

    ``read(offset, destination)`` fills ``destination`` from the region's byte ``offset``;
    ``release`` is called once this tensor and every view of it are gone (the region then
    may close). A tensor in a CUDA region also names its ``device`` and can be copied on
    it: ``to_device(offset, address, size, stream)`` enqueues a device-to-device copy on a
    CUDA stream, which is how a GPU engine on that device takes it (``copy_to_device``).
    A tensor in a page-locked system region names :data:`ANY_DEVICE`: its copy is a DMA
    transfer from the client's pages to whichever device the engine is on."""

    __slots__ = (
        "__weakref__",
        "_in_place",
        "_offset",
        "_parent",
        "_read",
        "_to_device",
        "device",
        "dtype",
        "shape",
    )

    def __init__(
        self,
        read: Callable[[int, memoryview], None],
        offset: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
        release: Callable[[], None] | None = None,
        parent: RegionTensor | None = None,
        device: int | None = None,
        to_device: Callable[[int, int, int, int], None] | None = None,
        in_place: Callable[[int, tuple[int, ...]], np.ndarray | None] | None = None,
    ) -> None:
        self._read = read
        self._offset = offset
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self._to_device = to_device
        # For a mapped system region: the bytes at (offset, shape) as an array over the
        # mapping itself, or None where they cannot be.
        self._in_place = in_place
        # A view holds the tensor it came from: the region stays held while any is alive.
        self._parent = parent
        if release is not None:
            weakref.finalize(self, release)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        # math.prod: NumPy's turns the shape into an array first, 5-10 us a call on the
        # 2-core machine, and the request path asks for the size several times.
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def _view(self, offset: int, shape: tuple[int, ...]) -> RegionTensor:
        return RegionTensor(
            self._read,
            offset,
            shape,
            self.dtype,
            parent=self,
            device=self.device,
            to_device=self._to_device,
            in_place=self._in_place,
        )

    def reshape(self, shape: tuple[int, ...]) -> RegionTensor:
        view = self._view(self._offset, tuple(shape))
        if view.size != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {tuple(shape)}")
        return view

    def rows(self, start: int, stop: int) -> RegionTensor:
        """Rows ``start:stop`` of the first dimension (contiguous in the region)."""
        row_bytes = self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0
        return self._view(self._offset + start * row_bytes, (stop - start, *self.shape[1:]))

    def copy_to_device(self, address: int, stream: int) -> None:
        """Enqueue a copy of this tensor's bytes to device ``address`` on CUDA ``stream``;
        only a tensor in a CUDA region or a page-locked one (``device`` not None) can. The
        tensor must stay alive until the stream has run the copy: it holds the region open."""
        if self._to_device is None:
            raise ValueError(
                "only a tensor in a CUDA or page-locked shared-memory region is copied to a device"
            )
        self._to_device(self._offset, address, self.nbytes, stream)

    def read_into(self, destination: np.ndarray) -> None:
        """Fill ``destination`` (C-contiguous, as many bytes as this tensor) from the region."""
        if destination.nbytes != self.nbytes or not destination.flags.c_contiguous:
            raise ValueError(
                f"a region tensor of {self.nbytes} bytes is read into a C-contiguous buffer of "
                f"as many, not {destination.nbytes} bytes"
            )
        self._read(self._offset, memoryview(cast(Any, destination)).cast("B"))

    def array(self) -> np.ndarray:
        """The tensor as an array: over the region's mapping itself where it is mapped (no
        copy; read-only), else read into an array of its own. What an engine that does not
        read regions itself is given; one that stages inputs reads them straight into its
        staging buffers instead (:meth:`read_into`)."""
        if self._in_place is not None:
            array = self._in_place(self._offset, self.shape)
            if array is not None:
                return array
        return self.__array__()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        self.read_into(array)
        return array if dtype is None else array.astype(dtype, copy=False)


class DeviceOutput:
    """Where one request's output goes in a client's CUDA shared-memory region on
    ``device``: a GPU engine on that device copies the request's rows there from its own
    output buffer (:meth:`copy_from_device`), before its launch is done, and the output
    never crosses to the host and back. ``written`` is the bytes so copied, None while no
    engine did (the data plane then writes the output from host memory, as for any other
    region). ``region`` is the registration it writes into: the data plane checks the name
    still stands for it when the request is answered."""

    __slots__ = ("__weakref__", "_from_device", "byte_size", "device", "region", "written")

    def __init__(
        self,
        region: object,
        device: int,
        byte_size: int,
        from_device: Callable[[int, int, int], bool],
        release: Callable[[], None] | None = None,
    ) -> None:
        self.region = region
        self.device = device
        self.byte_size = byte_size
        self._from_device = from_device
        self.written: int | None = None
        if release is not None:
            weakref.finalize(self, release)

    def copy_from_device(self, address: int, size: int, stream: int) -> bool:
        """Enqueue a copy of ``size`` bytes from device ``address`` into the target on CUDA
        ``stream``; False (nothing enqueued) where they do not fit it or the driver refused,
        which the data plane's write from the host then reports."""
        if size > self.byte_size or not self._from_device(address, size, stream):
            return False
        self.written = size
        return True


class HostOutput:
    """Where one request's output goes in a mapped system shared-memory region: ``buffer``,
    the target's bytes in the mapping itself (writable). A CPU engine whose runtime can
    write an output into memory given to it (ONNX Runtime's I/O binding) puts the output
    there and sets ``written``; otherwise the data plane copies it there after the run, as
    before. ``region`` as for :class:`DeviceOutput`; the data plane also checks that the
    region's object was not truncated under the write. The buffer holds the region open
    while it lives (a view of a region does), so the target needs no hold of its own."""

    __slots__ = ("buffer", "region", "written")

    def __init__(self, region: object, buffer: np.ndarray) -> None:
        self.region = region
        self.buffer = buffer
        self.written: int | None = None

    @property
    def byte_size(self) -> int:
        return int(self.buffer.nbytes)


# What an input tensor is between the frontends and an engine's gather.
Tensor = np.ndarray | RegionTensor
# Per output name, one entry per request of a batch (in the batch's order): where that
# request's rows of the output may be written in place (on a device, or in a mapped region
# on the host), or None.
OutputTargets = dict[str, list[DeviceOutput | HostOutput | None]]


@dataclass(slots=True)
class InferInput:
    """One input tensor as the client sent it: wire datatype name, shape and data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Tensor


@dataclass(slots=True)
class OutputTensor:
    """One output tensor of a response. An output written into a shared-memory region has
    the region's parameters (``shared_memory_region``, ``shared_memory_byte_size``) and no
    data for the wire."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SharedMemoryTarget:
    """Where a requested output goes instead of the response: bytes of a registered
    system or CUDA shared-memory region, from ``offset`` (within the region) for
    ``byte_size``."""

    region: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class InferRequest:
    """An inference request for one model version ("" means the policy's choice)."""

    model_name: str
    inputs: list[InferInput]
    model_version: str = ""
    id: str = ""
    # Names of the outputs to return; None returns every output.
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # perf_counter_ns when the frontend received the request; 0 means "when the core did".
    arrival_ns: int = 0
    # perf_counter_ns when the core accepted it (validated); queue time counts from here.
    admitted_ns: int = 0
    # Outputs to write into shared-memory regions rather than send, by output name.
    output_regions: dict[str, SharedMemoryTarget] | None = None
    # Of those, the ones an engine may write in place: in CUDA regions (a GPU engine on
    # the device) and large ones in mapped system regions (a CPU engine).
    output_targets: dict[str, DeviceOutput | HostOutput] | None = None
    # Mapped system regions whose bytes inputs are read from in place: the request fails
    # where one of them was truncated under its mapping before the request finished.
    regions_in_place: list[Any] | None = None


@dataclass(slots=True)
class InferResponse:
    """The outputs of one request, in the order the request asked for them."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """Name, datatype and shape (-1 for variable, batch dim included) of a model tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What KServe v2's model metadata endpoint returns."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """A row of the repository index: a model (and version) and its state."""

    name: str
    version: str
    state: str
    reason: str
