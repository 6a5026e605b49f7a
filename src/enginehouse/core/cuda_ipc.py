"""Device memory that another process exported with ``cudaIpcGetMemHandle``, opened here
through the CUDA driver API.

Triton's CUDA shared-memory extension hands the server a 64-byte IPC handle of a client's
``cudaMalloc`` allocation. The driver library (``libcuda.so.1``, present wherever an NVIDIA
driver is) is called through ctypes, so serving such regions needs no CUDA Python package
and works beside PyTorch: both use the device's primary context, which an opened allocation
holds for as long as it is open (in a server with no GPU model nothing else may) and makes
current on the calling thread for each copy. A GPU engine on the allocation's device takes
its inputs from it with device-to-device copies on its own stream (``copy_to_device``); other
readers copy to host memory. Every copy is bounds-checked against the size
the driver reports for the allocation; nothing here touches memory past it.

The same driver page-locks a client's system region on a GPU host (``PageLockedHost``):
a GPU engine then has the DMA engine take an input from the client's pages to the device,
where it would otherwise first copy it on a CPU into its own pinned staging buffer.
"""

from __future__ import annotations

import ctypes
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

IPC_HANDLE_SIZE = 64
_LAZY_ENABLE_PEER_ACCESS = 1
# cuMemHostRegister: page-locked for every context, not only the one current at the call.
_HOST_REGISTER_PORTABLE = 0x01


class CudaIpcError(Exception):
    """The driver refused (no driver, a bad handle, a device that does not exist)."""


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class _Driver:
    """The few driver entry points used here, resolved once."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaIpcError(f"no CUDA driver on this machine ({exc})") from None
        self._lib = lib
        self.init = self._entry("cuInit")
        self.device_count = self._entry("cuDeviceGetCount")
        self.device_get = self._entry("cuDeviceGet")
        self.retain = self._entry("cuDevicePrimaryCtxRetain")
        self.release = self._entry("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
        self.push = self._entry("cuCtxPushCurrent_v2", "cuCtxPushCurrent")
        self.pop = self._entry("cuCtxPopCurrent_v2", "cuCtxPopCurrent")
        self.open = self._entry("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        self.open.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
        self.close = self._entry("cuIpcCloseMemHandle")
        self.close.argtypes = [ctypes.c_uint64]
        self.address_range = self._entry("cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        self.address_range.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        ]
        self.to_host = self._entry("cuMemcpyDtoH_v2", "cuMemcpyDtoH")
        self.to_host.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        self.to_device = self._entry("cuMemcpyHtoD_v2", "cuMemcpyHtoD")
        self.to_device.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        self.device_to_device = self._entry("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync")
        self.device_to_device.argtypes = [
            ctypes.c_uint64,
            ctypes.c_uint64,
            ctypes.c_size_t,
            ctypes.c_void_p,
        ]
        self.host_register = self._entry("cuMemHostRegister_v2", "cuMemHostRegister")
        self.host_register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self.host_unregister = self._entry("cuMemHostUnregister")
        self.host_unregister.argtypes = [ctypes.c_void_p]
        self.host_to_device = self._entry("cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync")
        self.host_to_device.argtypes = [
            ctypes.c_uint64,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
        ]
        self._error_name = self._entry("cuGetErrorName")
        self.check(self.init(0), "cuInit")

    def _entry(self, *names: str) -> Any:
        for name in names:
            try:
                return getattr(self._lib, name)
            except AttributeError:
                continue
        raise CudaIpcError(f"the CUDA driver has no {names[0]}")

    def check(self, status: int, call: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self._error_name(status, ctypes.byref(name))
            label = name.value.decode() if name.value else f"error {status}"
            raise CudaIpcError(f"{call} failed: {label}")


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def driver() -> _Driver:
    """The driver, loaded and initialised on first use (CudaIpcError without one)."""
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


def available() -> bool:
    """Whether a CUDA driver with at least one device is here."""
    try:
        return device_count() > 0
    except CudaIpcError:
        return False


def device_count() -> int:
    cuda = driver()
    count = ctypes.c_int()
    cuda.check(cuda.device_count(ctypes.byref(count)), "cuDeviceGetCount")
    return count.value


class _PrimaryContext:
    """A hold on a device's primary context (the one PyTorch uses too), kept for as long as
    an allocation opened in it is: were the last hold released, the driver would destroy the
    context and the opened pointer with it. ``current()`` makes it current on the calling
    thread for a block of calls."""

    def __init__(self, device_id: int) -> None:
        self.cuda = driver()
        self.device = ctypes.c_int()
        self.cuda.check(self.cuda.device_get(ctypes.byref(self.device), device_id), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self.cuda.check(
            self.cuda.retain(ctypes.byref(self.context), self.device), "cuDevicePrimaryCtxRetain"
        )

    @contextmanager
    def current(self) -> Iterator[_Driver]:
        self.cuda.check(self.cuda.push(self.context), "cuCtxPushCurrent")
        try:
            yield self.cuda
        finally:
            self.cuda.pop(ctypes.byref(ctypes.c_void_p()))

    def release(self) -> None:
        self.cuda.release(self.device)


def _address(buffer: memoryview) -> int:
    """Where a contiguous host buffer's bytes start (read-only ones too)."""
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


class _OpenedInContext(ABC):
    """What an opened allocation and page-locked host memory share: a hold on a primary
    context, a size that bounds every copy, and a close that undoes the opening in that
    context, once."""

    _what = ""

    def __init__(self, context: _PrimaryContext) -> None:
        self._context = context
        self.size = 0
        self._closed = False

    def _bounds(self, offset: int, size: int) -> None:
        if self._closed:
            raise CudaIpcError(f"the {self._what} was closed")
        if offset < 0 or offset + size > self.size:
            raise CudaIpcError(
                f"{size} bytes at offset {offset} run past the {self._what} ({self.size} bytes)"
            )

    @abstractmethod
    def _undo(self, cuda: _Driver) -> None:
        """Undo the opening (the context is current)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._context.current() as cuda:
                self._undo(cuda)
        finally:
            self._context.release()


class ImportedAllocation(_OpenedInContext):
    """A client's device allocation opened from its IPC handle; closed by :meth:`close`."""

    _what = "allocation"

    def __init__(self, handle: bytes, device_id: int) -> None:
        if len(handle) != IPC_HANDLE_SIZE:
            raise CudaIpcError(
                f"a CUDA IPC handle is {IPC_HANDLE_SIZE} bytes, this one is {len(handle)}"
            )
        count = device_count()
        if not 0 <= device_id < count:
            raise CudaIpcError(f"device {device_id} does not exist here ({count} devices)")
        self.device_id = device_id
        raw = _Handle()
        ctypes.memmove(ctypes.addressof(raw), handle, IPC_HANDLE_SIZE)
        pointer = ctypes.c_uint64()
        super().__init__(_PrimaryContext(device_id))
        try:
            with self._context.current() as cuda:
                cuda.check(
                    cuda.open(ctypes.byref(pointer), raw, _LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle",
                )
                base, size = ctypes.c_uint64(), ctypes.c_size_t()
                status = cuda.address_range(ctypes.byref(base), ctypes.byref(size), pointer.value)
                if status != 0:
                    cuda.close(pointer.value)
                    cuda.check(status, "cuMemGetAddressRange")
        except BaseException:
            self._context.release()
            raise
        self.pointer = pointer.value
        # What the allocation holds from the opened pointer on: the most any copy may touch.
        self.size = int(size.value) - (self.pointer - int(base.value))

    def read(self, offset: int, destination: memoryview) -> None:
        """Fill ``destination`` (contiguous host memory) from ``offset``."""
        self._bounds(offset, destination.nbytes)
        if not destination.nbytes:
            return
        with self._context.current() as cuda:
            cuda.check(
                cuda.to_host(_address(destination), self.pointer + offset, destination.nbytes),
                "cuMemcpyDtoH",
            )

    def write(self, offset: int, source: memoryview) -> None:
        """Copy ``source`` (contiguous host memory) to ``offset``."""
        self._bounds(offset, source.nbytes)
        if not source.nbytes:
            return
        with self._context.current() as cuda:
            cuda.check(
                cuda.to_device(self.pointer + offset, _address(source), source.nbytes),
                "cuMemcpyHtoD",
            )

    def copy_to_device(self, offset: int, destination: int, size: int, stream: int) -> None:
        """Enqueue a copy of ``size`` bytes from ``offset`` to device address
        ``destination`` on ``stream`` (a ``CUstream``, such as a torch stream's
        ``cuda_stream``): the bytes never leave the device. The allocation must stay open
        until the stream has run the copy."""
        self._copy_on_device(offset, size, destination, into_allocation=False, stream=stream)

    def copy_from_device(self, offset: int, source: int, size: int, stream: int) -> None:
        """Enqueue a copy of ``size`` bytes from device address ``source`` to ``offset`` on
        ``stream``: an output written where the client reads it, without the host. The
        allocation must stay open until the stream has run the copy."""
        self._copy_on_device(offset, size, source, into_allocation=True, stream=stream)

    def _copy_on_device(
        self, offset: int, size: int, other: int, into_allocation: bool, stream: int
    ) -> None:
        self._bounds(offset, size)
        if not size:
            return
        here = self.pointer + offset
        destination, source = (here, other) if into_allocation else (other, here)
        with self._context.current() as cuda:
            cuda.check(
                cuda.device_to_device(destination, source, size, stream), "cuMemcpyDtoDAsync"
            )

    def _undo(self, cuda: _Driver) -> None:
        cuda.close(self.pointer)


class PageLockedHost(_OpenedInContext):
    """Host memory (a client's system region, mapped) page-locked by the driver for as long
    as this is open, for every device (``PORTABLE``), so that a GPU engine's copy of an input
    in it is one DMA transfer from the client's pages to the device, with no CPU copy.

    Locking takes the pages as they are when it is made: the driver holds them, so a client
    that truncates its object afterwards cannot make a copy fault (it reads the pages it
    held), and the server's checks of the object's size answer its requests with a 400.
    Registering costs about as much as touching every page once, so it is done once, when
    the region is registered, and undone when the region is freed.
    """

    _what = "page-locked memory"

    def __init__(self, address: int, size: int) -> None:
        super().__init__(_PrimaryContext(0))  # any context will do: PORTABLE locks for all
        try:
            with self._context.current() as cuda:
                cuda.check(
                    cuda.host_register(address, size, _HOST_REGISTER_PORTABLE),
                    "cuMemHostRegister",
                )
        except BaseException:
            self._context.release()
            raise
        self.address = address
        self.size = size

    def copy_to_device(self, offset: int, destination: int, size: int, stream: int) -> None:
        """Enqueue a copy of ``size`` bytes from ``offset`` to device address ``destination``
        on ``stream``, in the context current on the calling thread (a GPU engine's, whose
        stream it is). The memory must stay locked until the stream has run the copy."""
        self._bounds(offset, size)
        if not size:
            return
        cuda = self._context.cuda
        cuda.check(
            cuda.host_to_device(destination, self.address + offset, size, stream),
            "cuMemcpyHtoDAsync",
        )

    def _undo(self, cuda: _Driver) -> None:
        cuda.host_unregister(self.address)
