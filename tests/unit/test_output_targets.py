"""Outputs bound for CUDA regions, as the scheduler hands them to an engine: a target copies
only what fits it and says whether it did, holds its region until it is gone, and a batch's
targets line up with its requests. The device copies themselves run in tests/gpu."""

from __future__ import annotations

import gc
import os
import uuid

import numpy as np

from enginehouse.backends.base import Engine
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.messages import DeviceOutput, InferRequest, SharedMemoryTarget
from enginehouse.scheduler.base import Work, output_targets_of


def target(byte_size: int, accepts: bool = True) -> tuple[DeviceOutput, list[tuple[int, ...]]]:
    copies: list[tuple[int, ...]] = []

    def from_device(source: int, size: int, stream: int) -> bool:
        copies.append((source, size, stream))
        return accepts

    return DeviceOutput("region", 0, byte_size, from_device), copies


def test_a_target_copies_what_fits_it_and_says_so() -> None:
    fits, copies = target(40)
    assert fits.copy_from_device(0x1000, 40, 7)
    assert fits.written == 40
    assert copies == [(0x1000, 40, 7)]

    small, copies = target(39)
    assert not small.copy_from_device(0x1000, 40, 7)
    assert small.written is None
    assert copies == []  # nothing enqueued past its end

    refused, copies = target(40, accepts=False)
    assert not refused.copy_from_device(0x1000, 40, 7)
    assert refused.written is None  # the data plane writes it from the host, saying why


def test_a_target_releases_its_region_once_gone() -> None:
    released: list[bool] = []
    held = DeviceOutput("region", 0, 8, lambda *_: True, lambda: released.append(True))
    assert released == []
    del held
    gc.collect()
    assert released == [True]


def work(output_targets: dict[str, DeviceOutput] | None, rows: int = 1) -> Work:
    request = InferRequest("m", [], output_targets=output_targets)
    return Work(request, {"x": np.zeros((rows, 2), np.float32)}, ("y", "z"), rows, 0, 8 * rows)


def test_a_batch_s_targets_line_up_with_its_requests() -> None:
    assert output_targets_of([work(None), work(None)]) is None
    y0, _ = target(8)
    z2, _ = target(8)
    y2, _ = target(8)
    lined_up = output_targets_of([work({"y": y0}), work(None, rows=3), work({"y": y2, "z": z2})])
    assert lined_up == {"y": [y0, None, y2], "z": [None, None, z2]}


def test_engines_without_device_buffers_leave_targets_to_the_host() -> None:
    class Plain(Engine):
        def execute(self, inputs: dict[str, np.ndarray], output_names: object) -> list[np.ndarray]:
            return []

    y, copies = target(8)
    x = np.ones((2, 2), np.float32)
    gathered = Plain().gather({"x": [x[:1], x[1:]]}, {"y": [y, None]})
    np.testing.assert_array_equal(gathered["x"], x)
    assert y.written is None and copies == []


def test_system_regions_have_no_device_targets() -> None:
    key = f"eh_test_{uuid.uuid4().hex[:8]}"
    with open(f"/dev/shm/{key}", "wb") as handle:
        handle.write(bytes(64))
    regions = SharedMemoryRegions()
    try:
        regions.register("sys", f"/{key}", 0, 64)
        assert regions.output_targets({"y": SharedMemoryTarget("sys", 0, 64)}) is None
        assert regions.output_targets({"y": SharedMemoryTarget("unknown", 0, 64)}) is None
    finally:
        regions.close()
        os.unlink(f"/dev/shm/{key}")
