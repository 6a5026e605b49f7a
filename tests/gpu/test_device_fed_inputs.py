"""A CUDA-graph engine fed on the device: batch parts that wait in device memory on the
engine's GPU are copied device to device into its static input buffers, the other parts
from its staging buffers, and the bucket's graph without input copies runs; parts on
another device, or in host memory, take the staging path (skipped without a GPU).

The device parts here are :class:`RegionTensor` s over this process's own device memory,
copied by the same driver call that copies a client's IPC-opened allocation in a server
(tests/gpu/test_cuda_shared_memory.py serves those). Outputs bound for device memory on the
engine's GPU are copied there from the graph's output buffers."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends.cuda_graphs import CudaGraphEngine
from enginehouse.core import cuda_ipc
from enginehouse.messages import DeviceOutput, RegionTensor

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WIDTH = 6


def config() -> mc.ModelConfig:
    model = mc.ModelConfig(name="affine", max_batch_size=8)
    model.input.add(name="x", data_type=mc.TYPE_FP32, dims=[WIDTH])
    model.input.add(name="scale", data_type=mc.TYPE_FP32, dims=[1])
    model.output.add(name="y", data_type=mc.TYPE_FP32, dims=[WIDTH])
    return model


def affine(x: Any, scale: Any) -> Any:
    return x * scale + 1.0


@pytest.fixture
def engine() -> Iterator[CudaGraphEngine]:
    built = CudaGraphEngine(torch, affine, config(), "cuda:0", [1, 2, 4, 8])
    yield built
    built.close()


def on_device(array: np.ndarray, device: int = 0) -> tuple[RegionTensor, Any]:
    """``array`` in device memory of this process, as a region tensor over it (and the
    device tensor that holds the bytes, to keep alive)."""
    held = torch.from_numpy(array.copy()).to(f"cuda:{device}")
    torch.cuda.synchronize()
    cuda = cuda_ipc.driver()
    base = held.data_ptr()

    def read(offset: int, destination: memoryview) -> None:
        raw = held.cpu().numpy().view(np.uint8).reshape(-1)
        np.frombuffer(destination, np.uint8)[:] = raw[offset : offset + destination.nbytes]

    def to_device(offset: int, address: int, size: int, stream: int) -> None:
        cuda.check(
            cuda.device_to_device(address, base + offset, size, ctypes.c_void_p(stream)),
            "cuMemcpyDtoDAsync",
        )

    tensor = RegionTensor(read, 0, array.shape, array.dtype, device=device, to_device=to_device)
    return tensor, held


def test_parts_on_the_device_are_copied_there_between_host_parts(engine: CudaGraphEngine) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, WIDTH)).astype(np.float32)
    scale = rng.standard_normal((7, 1)).astype(np.float32)
    x_middle, x_held = on_device(x[2:5])
    scale_first, scale_held = on_device(scale[:2])
    parts = {
        # rows 0-1 and 5-6 from the host, 2-4 on the device (a row of a view: rows())
        "x": [x[:2], x_middle.rows(0, 2), x_middle.rows(2, 3), x[5:]],
        # rows 0-1 on the device, the rest from the host
        "scale": [scale_first, scale[2:]],
    }
    got = engine.execute(engine.gather(parts), ["y"])[0]
    np.testing.assert_allclose(got, x * scale + 1.0, rtol=1e-6)
    assert engine.device_fed_batches == 1
    del x_held, scale_held

    # Host parts alone: the graph that copies from the staging buffers.
    again = engine.execute(engine.gather({"x": [x[:3]], "scale": [scale[:3]]}), ["y"])[0]
    np.testing.assert_allclose(again, x[:3] * scale[:3] + 1.0, rtol=1e-6)
    assert engine.device_fed_batches == 1


def test_a_whole_batch_on_the_device_padded_to_its_bucket(engine: CudaGraphEngine) -> None:
    x = np.arange(5 * WIDTH, dtype=np.float32).reshape(5, WIDTH)
    scale = np.full((5, 1), 2.0, np.float32)
    tensors = [on_device(x), on_device(scale)]
    staged = engine.gather({"x": [tensors[0][0]], "scale": [tensors[1][0]]})
    launched = engine.launch(staged, ["y"])
    assert launched is not None
    torch.cuda.synchronize()
    np.testing.assert_allclose(launched.outputs()[0], x * 2.0 + 1.0)
    assert engine.device_fed_batches == 1


def test_parts_on_another_device_are_read_through_the_host(engine: CudaGraphEngine) -> None:
    """A region on a device other than the engine's is read into the staging rows, as
    system regions are; here its device id is one the engine does not run on."""
    x = np.ones((2, WIDTH), np.float32)
    elsewhere, held = on_device(x)
    elsewhere.device = 1  # not the engine's device: only its host read may be used
    got = engine.execute(
        engine.gather({"x": [elsewhere], "scale": [np.ones((2, 1), np.float32)]}), ["y"]
    )
    np.testing.assert_allclose(got[0], x + 1.0)
    assert engine.device_fed_batches == 0
    del held


def device_target(held: Any, device: int = 0, byte_size: int | None = None) -> DeviceOutput:
    """A target over ``held`` (this process's device memory), written by the driver call that
    writes a client's IPC-opened allocation in a server."""
    cuda = cuda_ipc.driver()

    def from_device(source: int, size: int, stream: int) -> bool:
        cuda.check(
            cuda.device_to_device(held.data_ptr(), source, size, ctypes.c_void_p(stream)),
            "cuMemcpyDtoDAsync",
        )
        return True

    size = held.numel() * held.element_size() if byte_size is None else byte_size
    return DeviceOutput(held, device, size, from_device)


def test_outputs_bound_for_the_device_are_copied_there(engine: CudaGraphEngine) -> None:
    """Three requests in one batch (rows 0-1, 2-4, 5): the first and the last have their
    output in device memory, the middle one in the host's answer only; every answer also
    comes back through the host, as the response's shape needs it."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, WIDTH)).astype(np.float32)
    scale = rng.standard_normal((6, 1)).astype(np.float32)
    first = torch.full((2, WIDTH), -7.0, device="cuda:0")
    last = torch.full((1, WIDTH), -7.0, device="cuda:0")
    targets = {"y": [device_target(first), None, device_target(last)]}
    staged = engine.gather(
        {"x": [x[:2], x[2:5], x[5:]], "scale": [scale[:2], scale[2:5], scale[5:]]}, targets
    )
    got = engine.execute(staged, ["y"])[0]
    expected = x * scale + 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(first.cpu().numpy(), expected[:2], rtol=1e-6)
    np.testing.assert_allclose(last.cpu().numpy(), expected[5:], rtol=1e-6)
    assert [t.written if t else None for t in targets["y"]] == [2 * WIDTH * 4, None, WIDTH * 4]
    assert engine.device_written_outputs == 2


def test_outputs_fed_and_written_on_the_device(engine: CudaGraphEngine) -> None:
    """Input and output both on the device: the graph without input copies runs, and the
    output is copied from that graph's own output buffer."""
    x = np.arange(3 * WIDTH, dtype=np.float32).reshape(3, WIDTH)
    x_on_device, held = on_device(x)
    out = torch.zeros((3, WIDTH), device="cuda:0")
    target = device_target(out)
    staged = engine.gather(
        {"x": [x_on_device], "scale": [np.full((3, 1), 3.0, np.float32)]}, {"y": [target]}
    )
    engine.execute(staged, ["y"])
    np.testing.assert_allclose(out.cpu().numpy(), x * 3.0 + 1.0)
    assert engine.device_fed_batches == 1
    assert target.written == x.nbytes
    del held


def test_outputs_that_cannot_be_written_on_the_device_are_left_to_the_host(
    engine: CudaGraphEngine,
) -> None:
    """A target smaller than the rows, or on another device, is not written: the data plane
    writes it from the host (and reports the one that does not fit)."""
    x = np.ones((2, WIDTH), np.float32)
    scale = np.ones((2, 1), np.float32)
    small = torch.zeros((1, WIDTH), device="cuda:0")
    elsewhere = torch.zeros((1, WIDTH), device="cuda:0")
    targets = {
        "y": [device_target(small, byte_size=WIDTH * 4 - 1), device_target(elsewhere, device=1)]
    }
    got = engine.execute(
        engine.gather({"x": [x[:1], x[1:]], "scale": [scale[:1], scale[1:]]}, targets), ["y"]
    )
    np.testing.assert_allclose(got[0], x + 1.0)
    assert [t.written for t in targets["y"] if t] == [None, None]
    assert not small.any() and not elsewhere.any()
    assert engine.device_written_outputs == 0


WIDE = 1 << 20  # 4 MB a row: four rows are a batch large enough to go in row ranges


def wide_config() -> mc.ModelConfig:
    model = mc.ModelConfig(name="wide", max_batch_size=8)
    model.input.add(name="x", data_type=mc.TYPE_FP32, dims=[WIDE])
    model.output.add(name="y", data_type=mc.TYPE_FP32, dims=[WIDE])
    return model


@pytest.mark.parametrize("half", [False, True])
def test_a_large_host_batch_goes_to_the_device_range_by_range(half: bool) -> None:
    """Rows from the host beyond host_copies.RANGED_BYTES are sent to the device in ranges
    as the gather stages them, and the graph without input copies runs; a smaller batch takes
    the graph that copies its inputs. Staged as FP16 (``half``), each range is widened on the
    device as the whole batch was."""
    engine = CudaGraphEngine(torch, lambda x: x * 2.0 - 1.0, wide_config(), "cuda:0", [2, 8], half)
    try:
        rng = np.random.default_rng(5)
        x = rng.standard_normal((5, WIDE)).astype(np.float32)
        if half:
            x = x.astype(np.float16).astype(np.float32)  # exactly representable as staged
        last_rows = x[3:].view(np.uint8).reshape(-1)

        def read(offset: int, view: memoryview) -> None:
            np.frombuffer(view, np.uint8)[:] = last_rows[offset : offset + view.nbytes]

        # Parts that straddle the ranges' bounds, from a plain array and a region tensor.
        region = RegionTensor(read, 0, (2, WIDE), np.dtype(np.float32))
        got = engine.execute(engine.gather({"x": [x[:3], region]}), ["y"])[0]
        np.testing.assert_array_equal(got, x * 2.0 - 1.0)
        assert engine.ranged_batches == 1 and engine.device_fed_batches == 0
        small = engine.execute(engine.gather({"x": [x[:1]]}), ["y"])[0]
        np.testing.assert_array_equal(small, x[:1] * 2.0 - 1.0)
        assert engine.ranged_batches == 1
        # A padded batch after a larger one (four rows: 8 MB staged even as FP16).
        again = engine.execute(engine.gather({"x": [-x[1:5]]}), ["y"])[0]
        np.testing.assert_array_equal(again, -x[1:5] * 2.0 - 1.0)
        assert engine.ranged_batches == 2
    finally:
        engine.close()
