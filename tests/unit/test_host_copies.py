"""Large host copies split over threads land exactly where one np.copyto would put them;
FP32 rows into an FP16 staging buffer are converted as NumPy would convert them."""

from __future__ import annotations

import numpy as np
import pytest

from enginehouse.backends import host_copies
from enginehouse.messages import RegionTensor


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


needs_f16c = pytest.mark.skipif(not host_copies.HALF_STAGING, reason="_half not built or no F16C")


@needs_f16c
def test_fp32_rows_into_an_fp16_buffer_are_rounded_as_numpy_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host_copies, "_threads", lambda: 4)
    source = (np.random.default_rng(1).standard_normal((64, 3, 224, 224)) * 300).astype(np.float32)
    source.flat[:6] = [np.inf, -np.inf, 65504.0, 65520.0, 3e-8, -0.0]  # max, overflow, subnormal
    staging = np.zeros((80, 3, 224, 224), np.float16)
    host_copies.copy_rows(staging[8:72], source)
    with np.errstate(over="ignore"):  # 65520 overflows to inf, as the device's cast does
        want = source.astype(np.float16)
    assert np.array_equal(staging[8:72].view(np.uint16), want.view(np.uint16))
    assert not staging[:8].any() and not staging[72:].any()
    # Many parts at once, and one made of strided rows: each converted into its own rows.
    parts = [source[i : i + 1] for i in range(10)] + [source[10:20, :, ::-1]]
    staging[:] = 0
    pairs = [(staging[i : i + 1], part) for i, part in enumerate(parts[:10])]
    host_copies.copy_all([*pairs, (staging[10:20], parts[10])])
    assert np.array_equal(staging[:10], want[:10])
    assert np.array_equal(staging[10:20], source[10:20, :, ::-1].astype(np.float16))


@needs_f16c
def test_a_region_tensor_in_fp32_is_read_then_converted() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 3

    def read(offset: int, view: memoryview) -> None:
        view[:] = values.tobytes()[offset : offset + view.nbytes]

    tensor = RegionTensor(read, 0, (3, 4), np.dtype(np.float32))
    staging = np.zeros((3, 4), np.float16)
    host_copies.copy_rows(staging, tensor)
    assert np.array_equal(staging, values.astype(np.float16))


def test_other_narrowings_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot stage int64 rows in a float16 buffer"):
        host_copies.copy_rows(np.zeros((4, 8), np.float16), np.zeros((4, 8), np.int64))
