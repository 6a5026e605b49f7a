"""Inputs left in system shared-memory regions until their batch is gathered: read straight
into place (split over the copy threads too), held open while they wait even if the client
unregisters the region, and the region's descriptor closed once the last is gone. Real
objects under /dev/shm, no server."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from enginehouse import datatypes
from enginehouse.backends import host_copies
from enginehouse.backends.base import Engine
from enginehouse.core.regions import Region
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.errors import InvalidArgumentError
from enginehouse.messages import RegionTensor

ROWS, COLUMNS = 48, 1 << 16  # 12 MiB of float32: past the threshold for parallel copies


@pytest.fixture()
def region() -> Iterator[tuple[SharedMemoryRegions, str, np.ndarray]]:
    """A registered region holding ROWS x COLUMNS float32, and the data it holds."""
    key = f"eh_test_{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(0).standard_normal((ROWS, COLUMNS)).astype(np.float32)
    with open(f"/dev/shm/{key}", "wb") as handle:
        handle.write(data.tobytes())
    regions = SharedMemoryRegions()
    regions.register("r", f"/{key}", 0, data.nbytes)
    try:
        yield regions, key, data
    finally:
        regions.close()
        os.unlink(f"/dev/shm/{key}")


def _tensor(regions: SharedMemoryRegions, rows: int, offset_rows: int = 0) -> RegionTensor:
    parameters = {
        "shared_memory_region": "r",
        "shared_memory_offset": offset_rows * COLUMNS * 4,
        "shared_memory_byte_size": rows * COLUMNS * 4,
    }
    tensor = regions.read_input(parameters, datatypes.from_name("FP32"), (rows, COLUMNS), "x")
    assert isinstance(tensor, RegionTensor)
    return tensor


def _descriptors_of(key: str) -> int:
    """How many of this process's descriptors are open on shared-memory object ``key``
    (counted by what they name, not in all: other tests' servers in this process open and
    close sockets meanwhile)."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        found += target.startswith(f"/dev/shm/{key}")
    return found


def test_a_region_tensor_reads_what_the_region_holds(
    region: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    regions, _, data = region
    tensor = _tensor(regions, 8, offset_rows=4)
    assert tensor.shape == (8, COLUMNS) and tensor.dtype == np.float32
    assert tensor.nbytes == 8 * COLUMNS * 4 and tensor.ndim == 2
    np.testing.assert_array_equal(np.asarray(tensor), data[4:12])
    np.testing.assert_array_equal(np.asarray(tensor.rows(2, 5)), data[6:9])
    reshaped = tensor.reshape((8, 256, COLUMNS // 256))
    np.testing.assert_array_equal(np.asarray(reshaped), data[4:12].reshape(8, 256, -1))
    with pytest.raises(ValueError):
        tensor.reshape((7, COLUMNS))
    with pytest.raises(ValueError):
        tensor.read_into(np.empty((4, COLUMNS), np.float32))


def test_the_gather_reads_regions_straight_into_the_staging_rows(
    region: tuple[SharedMemoryRegions, str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_all and copy_rows, as a GPU instance's gather calls them, on several threads."""
    monkeypatch.setattr(host_copies, "_threads", lambda: 4)
    regions, _, data = region
    staging = np.zeros((64, COLUMNS), np.float32)
    sent = np.full((6, COLUMNS), 3.0, np.float32)
    parts = [_tensor(regions, 20), sent, _tensor(regions, 22, offset_rows=20)]
    pairs: list[tuple[np.ndarray, RegionTensor | np.ndarray]] = []
    offset = 0
    for part in parts:
        pairs.append((staging[offset : offset + part.shape[0]], part))
        offset += part.shape[0]
    host_copies.copy_all(pairs)
    np.testing.assert_array_equal(staging[:20], data[:20])
    np.testing.assert_array_equal(staging[20:26], sent)
    np.testing.assert_array_equal(staging[26:48], data[20:42])
    assert not staging[48:].any()
    whole = np.zeros((ROWS, COLUMNS), np.float32)
    host_copies.copy_rows(whole, _tensor(regions, ROWS))
    np.testing.assert_array_equal(whole, data)


def test_engines_without_staging_get_arrays() -> None:
    """The base gather hands an engine arrays, never region tensors."""

    class Plain(Engine):
        def execute(self, inputs: dict[str, np.ndarray], output_names: object) -> list:
            return []

    def ones(offset: int, view: memoryview) -> None:
        view[:] = b"\x01" * view.nbytes

    tensor = RegionTensor(ones, 0, (2, 4), np.dtype(np.uint8))
    gathered = Plain().gather({"a": [tensor], "b": [tensor, tensor]})
    assert type(gathered["a"]) is np.ndarray and gathered["a"].shape == (2, 4)
    assert gathered["b"].shape == (4, 4) and gathered["b"].min() == 1


def test_an_unregistered_region_stays_open_while_its_tensors_wait(
    region: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    regions, key, data = region
    assert _descriptors_of(key) == 1  # the region's, from registration
    tensor = _tensor(regions, 4)
    view = tensor.rows(1, 3)
    del tensor  # the view still holds it
    regions.unregister("r")
    os.unlink(f"/dev/shm/{key}")  # the client is gone too
    with open(f"/dev/shm/{key}", "wb") as handle:
        handle.write(b"\xff" * 64)  # a new object under the same name is not read
    np.testing.assert_array_equal(np.asarray(view), data[1:3])
    assert _descriptors_of(key) == 1  # still open on the unlinked object
    del view
    gc.collect()
    assert _descriptors_of(key) == 0  # the region's descriptor, closed at last


def test_a_region_truncated_before_or_after_the_request_is_a_400(
    region: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    regions, key, _ = region
    waiting = _tensor(regions, ROWS)
    os.truncate(f"/dev/shm/{key}", 1024)
    with pytest.raises(InvalidArgumentError, match="truncated"):
        _tensor(regions, 2)
    with pytest.raises(InvalidArgumentError, match="truncated"):
        np.asarray(waiting)


def test_pinning_asked_where_the_driver_cannot_pin_reads_as_before(
    region: tuple[SharedMemoryRegions, str, np.ndarray],
) -> None:
    """Pinning is asked of every region on a GPU host; where the CUDA driver refuses (here:
    none is loaded, or no device), the region registers and is read through its descriptor."""
    from enginehouse.core import cuda_ipc

    if cuda_ipc.available():
        pytest.skip("this machine can pin: tests/gpu/test_pinned_regions.py covers it")
    _, key, data = region
    regions = SharedMemoryRegions(pinned=True)
    try:
        regions.register("r", f"/{key}", 0, data.nbytes)
        [registered] = regions.status("r")
        assert isinstance(registered, Region) and not registered.pinned
        tensor = _tensor(regions, 3, offset_rows=5)
        assert tensor.device is None
        np.testing.assert_array_equal(np.asarray(tensor), data[5:8])
    finally:
        regions.close()
