"""Large host copies split over threads land exactly where one np.copyto would put them,
streamed or not, at any alignment; FP32 rows into an FP16 staging buffer are converted as
NumPy would convert them."""

from __future__ import annotations

import itertools

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


needs_staging = pytest.mark.skipif(host_copies._staging is None, reason="_staging not built")


@needs_staging
@pytest.mark.parametrize("size", [1, 15, 64, 65, 1000, 70_001])
def test_streamed_copies_land_exactly_at_every_alignment(size: int) -> None:
    assert host_copies._staging is not None
    source_buffer = np.random.default_rng(size).integers(0, 256, size + 40, dtype=np.uint8)
    for target_offset, source_offset, streaming in itertools.product(
        range(17), (0, 3, 16), (True, False)
    ):
        target = np.full(size + 40, 0xEE, np.uint8)
        source = source_buffer[source_offset : source_offset + size]
        host_copies._staging.copy(target[target_offset : target_offset + size], source, streaming)
        assert np.array_equal(target[target_offset : target_offset + size], source)
        assert (target[:target_offset] == 0xEE).all()
        assert (target[target_offset + size :] == 0xEE).all()
    with pytest.raises(ValueError, match="does not fill"):
        host_copies._staging.copy(np.zeros(8, np.uint8), np.zeros(9, np.uint8))


@needs_staging
def test_large_copies_stream_and_outputs_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_copies._staging is not None
    calls: list[int] = []
    real = host_copies._staging.copy
    monkeypatch.setattr(
        host_copies._staging, "copy", lambda d, s: (calls.append(d.nbytes), real(d, s))[1]
    )
    source = np.random.default_rng(2).standard_normal((8, 3, 64, 64)).astype(np.float32)
    staging = np.zeros((16, 3, 64, 64), np.float32)
    host_copies.copy_rows(staging[3:11], source)
    assert calls == [source.nbytes] and np.array_equal(staging[3:11], source)
    calls.clear()
    assert np.array_equal(host_copies.copied(source), source)
    host_copies.copy_rows(staging[:8, :, ::2], source[:, :, ::2])  # strided: NumPy copies it
    assert calls == []
    host_copies.copy_rows(staging[:1, :, :4], source[:1, :, :4])  # small: NumPy copies it
    assert calls == []


needs_f16c = pytest.mark.skipif(
    not host_copies.HALF_STAGING, reason="_staging not built or no F16C"
)


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


@needs_f16c
def test_fp16_targets_at_every_alignment_are_converted_whole() -> None:
    assert host_copies._staging is not None
    source = (np.random.default_rng(4).standard_normal(1003) * 100).astype(np.float32)
    want = source.astype(np.float16)
    # Odd offsets: float16 targets not even 2-byte aligned.
    for byte_offset, streaming in itertools.product(range(18), (True, False)):
        buffer = np.full(2 * 1003 + 40, 0xEE, np.uint8)
        target = np.ndarray((1003,), np.float16, buffer=buffer, offset=byte_offset)
        host_copies._staging.to_half(target, source, streaming)
        assert np.array_equal(target.view(np.uint16), want.view(np.uint16)), byte_offset
        assert (buffer[:byte_offset] == 0xEE).all()
        assert (buffer[byte_offset + 2 * 1003 :] == 0xEE).all()


def test_a_batch_in_row_ranges_lands_whole_and_says_each_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(host_copies, "_threads", lambda: 3)
    images = np.random.default_rng(6).standard_normal((24, 3, 224, 224)).astype(np.float32)
    labels = np.arange(24, dtype=np.float32).reshape(24, 1) * 1e5
    staging_images = np.zeros_like(images)
    staging_labels = np.zeros((32, 1), np.float32)

    def read(offset: int, view: memoryview) -> None:
        view[:] = images[10:].tobytes()[offset : offset + view.nbytes]

    region = RegionTensor(read, 0, (14, 3, 224, 224), np.dtype(np.float32))
    # Parts of unequal sizes across the ranges' bounds, two inputs, one part a region.
    copies = [
        (0, staging_images[:10], images[:10]),
        (10, staging_images[10:], region),
        (0, staging_labels[:24], labels),
    ]
    said: list[tuple[int, int]] = []
    seen_whole: list[bool] = []

    def copied_rows(start: int, stop: int) -> None:
        said.append((start, stop))
        seen_whole.append(np.array_equal(staging_images[:stop], images[:stop]))

    assert host_copies.copy_in_row_ranges(copies, 24, copied_rows)
    assert said == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert all(seen_whole)
    assert np.array_equal(staging_images, images)
    assert np.array_equal(staging_labels[:24], labels) and not staging_labels[24:].any()
    # Too few bytes for ranges to gain: nothing is copied and the caller copies at once.
    small = [(0, staging_images[:2, :, :8], images[:2, :, :8])]
    assert not host_copies.copy_in_row_ranges(small, 2, copied_rows)
    assert len(said) == 4
