"""System shared-memory regions pinned by the CUDA driver: an input in one is copied to the
device by DMA from the client's pages, within the region's bounds; a region truncated after
it was pinned is a 400 for new requests and never faults a copy; unregistering unpins it and
closes its descriptor. Real objects under /dev/shm, a real device, no server (skipped
without a GPU)."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from enginehouse import datatypes
from enginehouse.core import cuda_ipc
from enginehouse.core.regions import Region
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.errors import InvalidArgumentError
from enginehouse.messages import ANY_DEVICE, RegionTensor

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

ROWS, COLUMNS = 16, 4096
ROW_BYTES = COLUMNS * 4


@pytest.fixture()
def pinned() -> Iterator[tuple[SharedMemoryRegions, str, np.ndarray]]:
    """A region of ROWS x COLUMNS float32 registered 4 KiB + 8 bytes into its object (not on
    a page), pinned, and the data it holds."""
    key = f"eh_pin_{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(0).standard_normal((ROWS, COLUMNS)).astype(np.float32)
    lead = 4096 + 8
    with open(f"/dev/shm/{key}", "wb") as handle:
        handle.write(b"\0" * lead + data.tobytes())
    torch.cuda.init()
    regions = SharedMemoryRegions(pinned=True)
    regions.register("p", f"/{key}", lead, data.nbytes)
    try:
        yield regions, key, data
    finally:
        regions.close()
        os.unlink(f"/dev/shm/{key}")


def _tensor(regions: SharedMemoryRegions, first: int, rows: int) -> RegionTensor:
    parameters = {
        "shared_memory_region": "p",
        "shared_memory_offset": first * ROW_BYTES,
        "shared_memory_byte_size": rows * ROW_BYTES,
    }
    tensor = regions.read_input(parameters, datatypes.from_name("FP32"), (rows, COLUMNS), "x")
    assert isinstance(tensor, RegionTensor)
    return tensor


def _to_device(tensor: RegionTensor) -> np.ndarray:
    """The tensor copied to the device on a stream of its own, and back."""
    out = torch.empty(tensor.shape, dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tensor.copy_to_device(out.data_ptr(), int(stream.cuda_stream))
    stream.synchronize()
    return out.cpu().numpy()


def _descriptors_of(key: str) -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/dev/shm/{key}")
        except OSError:
            continue
    return found


def test_an_input_in_a_pinned_region_is_copied_to_the_device(
    pinned: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    regions, _, data = pinned
    [region] = regions.status("p")
    assert isinstance(region, Region) and region.pinned
    tensor = _tensor(regions, 3, 6)
    assert tensor.device == ANY_DEVICE
    np.testing.assert_array_equal(_to_device(tensor), data[3:9])
    np.testing.assert_array_equal(_to_device(tensor.rows(2, 5)), data[5:8])
    np.testing.assert_array_equal(np.asarray(tensor), data[3:9])  # CPU engines read it too


def test_a_copy_past_the_region_is_refused(
    pinned: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    regions, _, data = pinned
    [region] = regions.status("p")
    assert isinstance(region, Region)
    out = torch.empty(ROWS + 1, COLUMNS, dtype=torch.float32, device="cuda")
    with pytest.raises(cuda_ipc.CudaIpcError, match="run past"):
        region.copy_to_device(ROW_BYTES, out.data_ptr(), data.nbytes, 0)


def test_a_region_truncated_after_pinning(
    pinned: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    """New requests get a 400; a tensor decoded before the truncation is copied from the
    pages pinned at registration, without a fault."""
    regions, key, data = pinned
    waiting = _tensor(regions, 0, ROWS)
    os.truncate(f"/dev/shm/{key}", 4096)
    with pytest.raises(InvalidArgumentError, match="truncated"):
        _tensor(regions, 0, 2)
    np.testing.assert_array_equal(_to_device(waiting), data)


def test_unregistering_unpins_once_the_last_tensor_is_gone(
    pinned: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    regions, key, data = pinned
    [region] = regions.status("p")
    tensor = _tensor(regions, 1, 2)
    regions.unregister("p")
    assert region.pinned  # the tensor still holds it
    np.testing.assert_array_equal(_to_device(tensor), data[1:3])
    del tensor
    gc.collect()
    assert not region.pinned
    assert _descriptors_of(key) == 0
