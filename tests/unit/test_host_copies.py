"""Large host copies split over threads land exactly where one np.copyto would put them."""

from __future__ import annotations

import numpy as np
import pytest

from enginehouse.backends import host_copies


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((64, 3, 224, 224), np.float32), ((3, 700_000), np.float16), ((5,), np.int64)],
)
def test_parallel_copies_equal_a_plain_copy(
    shape: tuple[int, ...], dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_copies, "_threads", lambda: 4)
    source = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    destination = np.zeros_like(source)
    host_copies.copy_rows(destination, source)
    np.testing.assert_array_equal(destination, source)
    copy = host_copies.copied(source)
    np.testing.assert_array_equal(copy, source)
    assert not np.shares_memory(copy, source)


def test_a_copy_into_a_slice_of_a_larger_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_copies, "_threads", lambda: 3)
    staging = np.zeros((64, 1024, 1024), np.uint8)
    part = np.full((40, 1024, 1024), 7, np.uint8)
    host_copies.copy_rows(staging[10:50], part)
    assert staging[10:50].min() == 7 and staging[:10].max() == 0 and staging[50:].max() == 0


def test_mismatched_dtypes_are_refused_as_np_copyto_refuses_them() -> None:
    with pytest.raises(TypeError):
        host_copies.copy_rows(np.zeros((8, 1 << 20), np.float32), np.zeros((8, 1 << 20)))


def test_many_small_copies_spread_over_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_copies, "_threads", lambda: 4)
    staging = np.zeros((16, 3, 224, 224), np.float32)
    images = [np.full((1, 3, 224, 224), i, np.float32) for i in range(12)]
    pairs = [(staging[i : i + 1], image) for i, image in enumerate(images)]
    host_copies.copy_all(pairs)
    for i in range(12):
        assert staging[i].min() == staging[i].max() == i
    assert not staging[12:].any()
