"""Mapped system regions (the default where the mapping guard is built): inputs handed over in
place and kept open while any view of them lives, sizes checked against the object before
every access, and an object truncated under its mapping answered with a 400, not a crash."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from enginehouse import datatypes
from enginehouse.core.regions import Region
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.errors import InvalidArgumentError
from enginehouse.messages import RegionTensor, SharedMemoryTarget

INT32 = datatypes.from_name("INT32")


@pytest.fixture
def key() -> Iterator[str]:
    name = f"eh_map_{uuid.uuid4().hex[:8]}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.pwrite(fd, np.arange(2048, dtype=np.int32).tobytes(), 0)
    os.close(fd)
    yield f"/{name}"
    os.unlink(f"/dev/shm/{name}")


def _input(
    regions: SharedMemoryRegions, name: str, offset: int = 0, in_place: list[Region] | None = None
) -> object:
    parameters = {
        "shared_memory_region": name,
        "shared_memory_byte_size": 64,
        "shared_memory_offset": offset,
    }
    in_place = [] if in_place is None else in_place
    tensor = regions.read_input(parameters, INT32, (1, 16), "INPUT0", in_place)
    # What an engine without staging buffers of its own is handed (see the scheduler).
    return tensor.array() if isinstance(tensor, RegionTensor) else tensor


def _region(regions: SharedMemoryRegions, name: str) -> Region:
    region = regions.status(name)[0]
    assert isinstance(region, Region)
    return region


def test_an_input_is_the_mapping_itself_and_holds_the_region(key: str) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 4096, 256)
    in_place: list[Region] = []
    array = _input(regions, "r", in_place=in_place)
    assert isinstance(array, np.ndarray)
    assert array.tolist() == [list(range(1024, 1040))]
    assert not array.flags.writeable  # an engine cannot write into the client's memory
    region = _region(regions, "r")
    assert in_place == [region]  # the request checks it once it has run
    in_place.clear()
    # A reshape outlives the array it came from; the region stays held while it lives.
    rows = array.reshape(16)[4:]
    del array
    gc.collect()
    regions.unregister("r")
    assert os.fstat(region.fd)  # still open: a view of the input lives
    assert rows.tolist() == list(range(1028, 1040))
    del rows
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(region.fd)


def test_a_region_truncated_before_a_request_is_refused_not_faulted(key: str) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 0, 4096)
    os.truncate(f"/dev/shm/{key.lstrip('/')}", 32)
    with pytest.raises(InvalidArgumentError, match="truncated"):
        _input(regions, "r")
    region = _region(regions, "r")
    destination = np.zeros(16, np.int32)
    assert region.read(0, memoryview(destination)) == 32  # as far as the object goes
    assert destination[:8].tolist() == list(range(8))
    assert region.write(16, memoryview(np.ones(16, np.int32))) == 16
    regions.close()


def test_unaligned_inputs_are_copied_and_outputs_written_in_place(key: str) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 2, 1024)
    tensor = _input(regions, "r")
    assert tensor.flags.owndata  # read into an array of its own
    assert np.asarray(tensor).view(np.uint8).tobytes() == (
        np.arange(2048, dtype=np.int32).view(np.uint8)[2:66].tobytes()
    )
    region = _region(regions, "r")
    assert region.write(0, memoryview(np.full(4, 7, np.int32))) == 16
    fd = os.open(f"/dev/shm/{key.lstrip('/')}", os.O_RDONLY)
    try:
        assert os.pread(fd, 16, 2) == np.full(4, 7, np.int32).tobytes()
    finally:
        os.close(fd)
    del tensor
    regions.close()


def test_an_object_truncated_under_an_input_read_in_place_fails_that_request(key: str) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 4096, 4096)
    in_place: list[Region] = []
    array = _input(regions, "r", in_place=in_place)
    assert isinstance(array, np.ndarray)
    os.truncate(f"/dev/shm/{key.lstrip('/')}", 0)
    # What an engine does with its input: read it. Unguarded, this ends the process (SIGBUS).
    assert int(np.asarray(array).sum()) == 0
    region = in_place[0]
    assert region.faults() == 1
    with pytest.raises(InvalidArgumentError, match="truncated while a request used it"):
        region.check_whole("INPUT0")
    # The object grown back does not make the region usable: its pages are the guard's.
    os.truncate(f"/dev/shm/{key.lstrip('/')}", 8192)
    with pytest.raises(InvalidArgumentError, match="register it again"):
        _input(regions, "r")
    with pytest.raises(InvalidArgumentError, match="register it again"):
        regions.write(SharedMemoryTarget("r", 0, 64), np.zeros(16, np.int32), "OUTPUT0")
    del array
    gc.collect()
    regions.unregister("r")
    regions.register("r", key, 4096, 4096)
    array = _input(regions, "r")
    assert isinstance(array, np.ndarray) and int(np.asarray(array).sum()) == 0
    assert _region(regions, "r").faults() == 0
    del array
    regions.close()


def test_an_output_written_into_an_object_truncated_meanwhile_fails(key: str) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 0, 8192)
    region = _region(regions, "r")
    real = region.available

    def truncated_after_the_check() -> int:
        # The client truncates between the server's size check and its copy.
        size = real()
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 0)
        return size

    region.available = truncated_after_the_check  # type: ignore[method-assign]
    with pytest.raises(InvalidArgumentError, match="only 0 of 8192 bytes"):
        regions.write(SharedMemoryTarget("r", 0, 8192), np.ones(2048, np.int32), "OUTPUT0")
    assert region.faults() >= 1
    regions.close()
