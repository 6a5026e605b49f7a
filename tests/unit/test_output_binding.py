"""Outputs that ONNX Runtime writes straight into a mapped region (``HostOutput``): offered
only for large outputs of mapped regions, holding the region exactly as long as they live,
and written in place by a real session where the config fixes their shapes, with the plain
run wherever they cannot be."""

from __future__ import annotations

import gc
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends.base import Placement
from enginehouse.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeEngine
from enginehouse.backends.output_binding import OutputBinding
from enginehouse.core import mapping_guard
from enginehouse.core.regions import Region
from enginehouse.core.shared_memory import IN_PLACE_OUTPUT_BYTES, SharedMemoryRegions
from enginehouse.messages import HostOutput, SharedMemoryTarget

pytestmark = pytest.mark.skipif(not mapping_guard.AVAILABLE, reason="needs the mapping guard")

ELEMENTS = IN_PLACE_OUTPUT_BYTES // 2  # FP32: a row is twice the least offered
SIZE = 4 * IN_PLACE_OUTPUT_BYTES


@pytest.fixture
def key() -> Iterator[str]:
    name = f"eh_out_{uuid.uuid4().hex[:8]}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, SIZE)
    os.close(fd)
    yield f"/{name}"
    os.unlink(f"/dev/shm/{name}")


def _config(dims: str = str(ELEMENTS), datatype: str = "TYPE_FP32") -> mc.ModelConfig:
    return text_format.Parse(
        f'name: "copy" max_batch_size: 4 '
        f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{ELEMENTS}] }}] '
        f'output [{{ name: "OUTPUT0" data_type: {datatype} dims: [{dims}] }}]',
        mc.ModelConfig(),
    )


def _engine(tmp_path: Path, config: mc.ModelConfig) -> OnnxRuntimeEngine:
    shape = ["batch", ELEMENTS]
    graph = helper.make_graph(
        [helper.make_node("Neg", ["INPUT0"], ["OUTPUT0"])],
        "copy",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    engine = OnnxRuntimeBackend().load(
        config, tmp_path / "model.onnx", Placement(mc.ModelInstanceGroup.KIND_CPU, 0)
    )
    assert isinstance(engine, OnnxRuntimeEngine)
    return engine


def _target(regions: SharedMemoryRegions, offset: int = 0, size: int = SIZE) -> HostOutput:
    found = regions.output_targets({"OUTPUT0": SharedMemoryTarget("r", offset, size)})
    assert found is not None
    target = found["OUTPUT0"]
    assert isinstance(target, HostOutput)
    return target


def _region(regions: SharedMemoryRegions) -> Region:
    region = regions.status("r")[0]
    assert isinstance(region, Region)
    return region


def test_large_outputs_of_mapped_regions_are_offered(key: str) -> None:
    mapped = SharedMemoryRegions(mapped=True)
    mapped.register("r", key, 0, SIZE)
    small = SharedMemoryTarget("r", 0, IN_PLACE_OUTPUT_BYTES - 4)
    assert mapped.output_targets({"OUTPUT0": small}) is None  # the copy is cheaper
    assert _target(mapped).byte_size == SIZE
    # Not for a model whose engines cannot write them (decided once, at load).
    whole = SharedMemoryTarget("r", 0, SIZE)
    assert mapped.output_targets({"OUTPUT0": whole}, host=False) is None
    mapped.close()
    through_descriptors = SharedMemoryRegions(mapped=False)
    through_descriptors.register("r", key, 0, SIZE)
    assert through_descriptors.output_targets({"OUTPUT0": SharedMemoryTarget("r", 0, SIZE)}) is None
    through_descriptors.close()


def test_a_target_holds_its_region_while_it_lives_and_no_longer(key: str) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 0, SIZE)
    region = _region(regions)
    target = _target(regions)
    regions.unregister("r")
    assert os.fstat(region.fd)  # open: the target's buffer lives
    target.buffer[:4] = 1  # and is the region's memory, writable
    del target
    gc.collect()
    with pytest.raises(OSError):  # closed once, when the last holder went
        os.fstat(region.fd)
    regions.close()


def test_the_session_writes_a_requests_output_into_its_target(key: str, tmp_path: Path) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 0, SIZE)
    engine = _engine(tmp_path, _config())
    x = np.random.default_rng(0).standard_normal((2, ELEMENTS)).astype(np.float32)
    target = _target(regions)
    inputs = engine.gather({"INPUT0": [x]}, {"OUTPUT0": [target]})
    (result,) = engine.execute(inputs, ["OUTPUT0"])
    assert np.shares_memory(result, target.buffer)
    assert target.written == x.nbytes
    np.testing.assert_array_equal(result, -x)
    fd = os.open(f"/dev/shm/{key.lstrip('/')}", os.O_RDONLY)
    try:
        np.testing.assert_array_equal(
            np.frombuffer(os.pread(fd, x.nbytes, 0), np.float32), -x.ravel()
        )
    finally:
        os.close(fd)
    del result, target
    regions.close()


def test_outputs_that_cannot_be_written_in_place_take_the_plain_run(
    key: str, tmp_path: Path
) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 0, SIZE)
    engine = _engine(tmp_path, _config())
    x = np.ones((1, ELEMENTS), np.float32)
    # Two requests' rows: one output, two places.
    first, second = _target(regions), _target(regions)
    inputs = engine.gather({"INPUT0": [x, x]}, {"OUTPUT0": [first, second]})
    (result,) = engine.execute(inputs, ["OUTPUT0"])
    assert first.written is None and second.written is None
    assert result.shape == (2, ELEMENTS) and not np.shares_memory(result, first.buffer)
    # Targets set by a gather apply only to the inputs that gather made.
    target = _target(regions)
    engine.gather({"INPUT0": [x]}, {"OUTPUT0": [target]})
    (result,) = engine.execute({"INPUT0": x.copy()}, ["OUTPUT0"])
    assert target.written is None
    # A target smaller than the output, or unaligned, is not written.
    for small in (_target(regions, 0, x.nbytes - 4), _target(regions, 4, x.nbytes)):
        inputs = engine.gather({"INPUT0": [x]}, {"OUTPUT0": [small]})
        (result,) = engine.execute(inputs, ["OUTPUT0"])
        assert small.written is None
        np.testing.assert_array_equal(result, -x)
    # An input over the target's own bytes (one region named for both): a run reading it
    # while writing there would read its own output.
    shared = _target(regions)
    over = shared.buffer[: x.nbytes].view(np.float32).reshape(x.shape)
    over[...] = 3
    inputs = engine.gather({"INPUT0": [over]}, {"OUTPUT0": [shared]})
    (result,) = engine.execute(inputs, ["OUTPUT0"])
    assert shared.written is None
    np.testing.assert_array_equal(result, np.full(x.shape, -3, np.float32))
    del result, first, second, target, small, shared, over, inputs
    regions.close()


def test_a_config_whose_shapes_the_model_does_not_compute_falls_back(
    key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    regions = SharedMemoryRegions(mapped=True)
    regions.register("r", key, 0, SIZE)
    engine = _engine(tmp_path, _config())
    # What a config out of step with its model would bind: half the elements.
    engine._binding = OutputBinding.of(_config(str(ELEMENTS // 2)), engine._session)
    x = np.full((1, ELEMENTS), 2, np.float32)
    target = _target(regions)
    inputs = engine.gather({"INPUT0": [x]}, {"OUTPUT0": [target]})
    with caplog.at_level(logging.WARNING):
        (result,) = engine.execute(inputs, ["OUTPUT0"])
    np.testing.assert_array_equal(result, -x)
    assert target.written is None
    assert "outputs in place turned off" in caplog.text
    assert engine._binding is None  # not tried again
    del result, target
    regions.close()


def test_only_outputs_of_fixed_shapes_are_bound(tmp_path: Path) -> None:
    engine = _engine(tmp_path, _config())
    session = engine._session
    assert OutputBinding.of(_config("-1"), session) is None
    assert OutputBinding.of(_config(str(ELEMENTS), "TYPE_STRING"), session) is None
    assert OutputBinding.of(_config(), session) is not None
