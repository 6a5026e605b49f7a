"""Triton's system shared-memory extension, driven by tritonclient's own shared-memory
utilities over both protocols: tensors in regions, outputs written back, and every bad
region, offset, size or name answered 400 / INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer
from tests.integration.test_inference import simple_inputs

PROTOCOLS = [
    pytest.param((httpclient, "http"), id="http"),
    pytest.param((grpcclient, "grpc"), id="grpc"),
]
INPUT_BYTES = 16 * 4  # INT32 [1, 16]


@pytest.fixture(scope="module", params=["false", "true"], ids=["descriptor", "mapped"])
def served(
    request: pytest.FixtureRequest, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """Regions read through their descriptor (the default), then mapped as Triton does."""
    with InProcessServer.live(
        [example_repo],
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        "--map-shared-memory",
        request.param,
        log_path=tmp_path_factory.mktemp("log") / "shm.log",
    ) as server:
        yield server


class Regions:
    """Shared-memory objects a test made, unregistered and destroyed after it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.handles: list[Any] = []

    def make(self, byte_size: int, register: bool = True, name: str = "") -> tuple[str, str, Any]:
        name = name or f"r{uuid.uuid4().hex[:8]}"
        key = f"/eh_{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        if register:
            self.client.register_system_shared_memory(name, key, byte_size)
        return name, key, handle

    def close(self) -> None:
        self.client.unregister_system_shared_memory()
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture(params=PROTOCOLS)
def client(
    request: pytest.FixtureRequest, served: InProcessServer
) -> Iterator[tuple[Any, Any, Regions]]:
    module, protocol = request.param
    url = served.http_url if protocol == "http" else served.grpc_url
    connection = module.InferenceServerClient(url)
    regions = Regions(connection)
    try:
        yield module, connection, regions
    finally:
        regions.close()


def _shm_inputs(module: Any, regions: Regions, a: np.ndarray, b: np.ndarray) -> list[Any]:
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        region, _, handle = regions.make(INPUT_BYTES)
        shm.set_shared_memory_region(handle, [data])
        item = module.InferInput(name, [1, 16], "INT32")
        item.set_shared_memory(region, INPUT_BYTES)
        inputs.append(item)
    return inputs


def test_inputs_and_outputs_in_shared_memory(client: tuple[Any, Any, Regions]) -> None:
    module, connection, regions = client
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = _shm_inputs(module, regions, a, b)
    # Both outputs in one region, the second at an offset.
    out_region, _, out_handle = regions.make(2 * INPUT_BYTES)
    outputs = []
    for index, name in enumerate(("OUTPUT0", "OUTPUT1")):
        requested = module.InferRequestedOutput(name)
        requested.set_shared_memory(out_region, INPUT_BYTES, offset=index * INPUT_BYTES)
        outputs.append(requested)
    result = connection.infer("simple", inputs, outputs=outputs)
    total = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16])
    difference = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=INPUT_BYTES)
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(difference, a - b)
    output = result.get_output("OUTPUT0")
    # Nothing of the outputs travelled in the response; gRPC names the region, HTTP answers
    # as Triton does, with the output's name, datatype and shape alone.
    if module is httpclient:
        assert set(output) == {"name", "datatype", "shape"}
    else:
        assert output.parameters["shared_memory_region"].string_param == out_region
        assert not any(result.get_response().raw_output_contents)


def test_shared_and_sent_tensors_mix(client: tuple[Any, Any, Regions]) -> None:
    module, connection, regions = client
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.arange(16, 32, dtype=np.int32).reshape(1, 16)
    region, _, handle = regions.make(INPUT_BYTES)
    shm.set_shared_memory_region(handle, [a])
    first = module.InferInput("INPUT0", [1, 16], "INT32")
    first.set_shared_memory(region, INPUT_BYTES)
    second = module.InferInput("INPUT1", [1, 16], "INT32")
    second.set_data_from_numpy(b)
    out_region, _, out_handle = regions.make(INPUT_BYTES)
    shared_out = module.InferRequestedOutput("OUTPUT0")
    shared_out.set_shared_memory(out_region, INPUT_BYTES)
    sent_out = module.InferRequestedOutput("OUTPUT1")
    result = connection.infer("simple", [first, second], outputs=[shared_out, sent_out])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.int32, [1, 16]), a + b)


def test_regions_at_unaligned_offsets(client: tuple[Any, Any, Regions]) -> None:
    """INT32 tensors two bytes into their objects: a mapped region cannot hand such an input
    over in place (it is not aligned for its type), so it is copied out; outputs at an odd
    offset are written byte for byte."""
    module, connection, regions = client
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, dtype=np.int32)
    name = f"r{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(name, f"/eh_{name}", 2 + 2 * INPUT_BYTES + 3)
    regions.handles.append(handle)
    shm.set_shared_memory_region(handle, [a, b], offset=2)
    connection.register_system_shared_memory(name, f"/eh_{name}", 2 * INPUT_BYTES, offset=2)
    inputs = []
    for index, tensor in enumerate(("INPUT0", "INPUT1")):
        item = module.InferInput(tensor, [1, 16], "INT32")
        item.set_shared_memory(name, INPUT_BYTES, offset=index * INPUT_BYTES)
        inputs.append(item)
    out_name, _, out_handle = regions.make(3 + INPUT_BYTES)
    requested = module.InferRequestedOutput("OUTPUT1")
    requested.set_shared_memory(out_name, INPUT_BYTES, offset=3)
    result = connection.infer("simple", inputs, outputs=[requested])
    assert result.as_numpy("OUTPUT0") is None
    got = shm.get_contents_as_numpy(out_handle, np.uint8, [3 + INPUT_BYTES])[3:]
    np.testing.assert_array_equal(got.view(np.int32).reshape(1, 16), a - b)


def test_status_lists_registered_regions_and_unregister_forgets_them(
    client: tuple[Any, Any, Regions],
) -> None:
    module, connection, regions = client
    name, key, _ = regions.make(128)
    status = connection.get_system_shared_memory_status()
    if module is httpclient:
        listed = {entry["name"]: entry for entry in status}
        assert listed[name]["key"] == key and int(listed[name]["byte_size"]) == 128
    else:
        assert status.regions[name].key == key and status.regions[name].byte_size == 128
    connection.unregister_system_shared_memory(name)
    with pytest.raises(InferenceServerException):
        connection.get_system_shared_memory_status(name)
    metadata = connection.get_server_metadata()
    extensions = metadata["extensions"] if module is httpclient else metadata.extensions
    assert "system_shared_memory" in extensions


def _bad(status: str) -> bool:
    return status in ("400", "StatusCode.INVALID_ARGUMENT")


def _refused(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert _bad(str(info.value.status())), (info.value.status(), info.value.message())
    return str(info.value.message())


def test_bad_registrations_are_refused(client: tuple[Any, Any, Regions]) -> None:
    _, connection, regions = client
    name, key, _ = regions.make(64)
    assert "already registered" in _refused(connection.register_system_shared_memory, name, key, 64)
    other = f"o{uuid.uuid4().hex[:6]}"
    assert "fewer than" in _refused(connection.register_system_shared_memory, other, key, 128)
    assert "fewer than" in _refused(
        connection.register_system_shared_memory, other, key, 32, offset=48
    )
    for outside in ("/../etc/passwd", "/a/b", "..", "/nope_" + uuid.uuid4().hex):
        _refused(connection.register_system_shared_memory, other, outside, 8)


def test_bad_tensor_references_are_refused_and_serving_goes_on(
    client: tuple[Any, Any, Regions],
) -> None:
    module, connection, regions = client
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    region, _, handle = regions.make(INPUT_BYTES)
    shm.set_shared_memory_region(handle, [a])

    def infer_with(region_name: str, size: int, offset: int = 0, out: Any = None) -> str:
        first = module.InferInput("INPUT0", [1, 16], "INT32")
        first.set_shared_memory(region_name, size, offset=offset)
        second = module.InferInput("INPUT1", [1, 16], "INT32")
        second.set_data_from_numpy(a)
        return _refused(connection.infer, "simple", [first, second], outputs=out)

    assert "unable to find" in infer_with("never_registered", INPUT_BYTES)
    assert "runs past" in infer_with(region, INPUT_BYTES, offset=8)
    assert "bytes" in infer_with(region, INPUT_BYTES - 4)
    small, _, _ = regions.make(8)
    too_small = module.InferRequestedOutput("OUTPUT0")
    too_small.set_shared_memory(small, 8)
    assert "more than the 8 bytes" in infer_with(region, INPUT_BYTES, out=[too_small])
    result = connection.infer("simple", simple_inputs(module)[2])
    assert result.as_numpy("OUTPUT0") is not None


def test_a_region_the_client_removed_or_truncated(client: tuple[Any, Any, Regions]) -> None:
    module, connection, regions = client
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    region, key, handle = regions.make(INPUT_BYTES)
    shm.set_shared_memory_region(handle, [a])

    def infer() -> Any:
        first = module.InferInput("INPUT0", [1, 16], "INT32")
        first.set_shared_memory(region, INPUT_BYTES)
        second = module.InferInput("INPUT1", [1, 16], "INT32")
        second.set_data_from_numpy(a)
        return connection.infer("simple", [first, second])

    np.testing.assert_array_equal(infer().as_numpy("OUTPUT0"), a + a)
    regions.handles.remove(handle)
    shm.destroy_shared_memory_region(handle)  # unmapped and unlinked by the client
    assert not os.path.exists(f"/dev/shm/{key.lstrip('/')}")
    # The server's descriptor keeps the object: the region still reads what it held.
    np.testing.assert_array_equal(infer().as_numpy("OUTPUT0"), a + a)
    truncated, key2, _ = regions.make(INPUT_BYTES)
    os.truncate(f"/dev/shm/{key2.lstrip('/')}", 8)
    first = module.InferInput("INPUT0", [1, 16], "INT32")
    first.set_shared_memory(truncated, INPUT_BYTES)
    second = module.InferInput("INPUT1", [1, 16], "INT32")
    second.set_data_from_numpy(a)
    assert "truncated" in _refused(connection.infer, "simple", [first, second])
    assert connection.is_server_live()


def test_cuda_registrations_that_cannot_be_opened_are_refused(
    client: tuple[Any, Any, Regions],
) -> None:
    """A handle the driver cannot open (here no driver, or a handle of no allocation): a
    400 naming why, nothing registered, serving goes on. tests/gpu opens real ones."""
    module, connection, regions = client
    handle = base64.b64encode(bytes(64))
    message = _refused(connection.register_cuda_shared_memory, "nowhere", handle, 0, 64)
    assert "cannot open the IPC handle" in message
    short = _refused(connection.register_cuda_shared_memory, "short", base64.b64encode(b"x"), 0, 8)
    assert "64 bytes" in short or "no CUDA driver" in short
    status = connection.get_cuda_shared_memory_status()
    assert (list(status) if module is httpclient else list(status.regions)) == []
    connection.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException):
        connection.get_cuda_shared_memory_status("nowhere")
    # A CUDA region name that is a system region is not a CUDA region.
    name, _, _ = regions.make(64)
    with pytest.raises(InferenceServerException):
        connection.get_cuda_shared_memory_status(name)
    assert connection.is_server_live()


def test_cuda_registration_body_is_checked(served: InProcessServer) -> None:
    import http.client

    def post(body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=10)
        try:
            connection.request("POST", "/v2/cudasharedmemory/region/r/register", body=body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    for body in (
        b"{}",
        b'{"raw_handle": "AAAA", "device_id": 0, "byte_size": 8}',
        b'{"raw_handle": {"b64": "not base64!"}, "device_id": 0, "byte_size": 8}',
        b'{"raw_handle": {"b64": "AAAA"}, "device_id": -1, "byte_size": 8}',
        b'{"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 0}',
    ):
        status, text = post(body)
        assert status == 400, (body, text)
        assert b"error" in text


def test_registration_is_a_restricted_api(example_repo: Path) -> None:
    with InProcessServer.live(
        [example_repo],
        "--model-control-mode",
        "explicit",
        "--http-restricted-api",
        "shared-memory:admin-key=secret",
    ) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        with pytest.raises(InferenceServerException) as info:
            client.get_system_shared_memory_status()
        assert info.value.status() == "403"
        assert client.get_system_shared_memory_status(headers={"admin-key": "secret"}) == []


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_region_truncated_while_a_request_reads_it(tmp_path: Path, protocol: str) -> None:
    """The client truncates its object while the engine is about to read the input in
    place: that request gets a 400, the region is refused until registered again, and the
    server serves on (unguarded, the read would end the server with SIGBUS)."""
    from enginehouse.core import mapping_guard
    from enginehouse.testing import fake_backend

    if not mapping_guard.AVAILABLE:
        pytest.skip("the mapping guard is not built: regions are read through descriptors")
    fake_backend.write_model(tmp_path / "repo", "held", max_batch_size=0, dims="1024")
    controls = fake_backend.controls("held")
    module: Any = httpclient if protocol == "http" else grpcclient
    with InProcessServer.live([tmp_path / "repo"], "--map-shared-memory", "true") as server:
        connection = module.InferenceServerClient(
            server.http_url if protocol == "http" else server.grpc_url
        )
        regions = Regions(connection)
        data = np.arange(1024, dtype=np.float32)

        def request(region: str) -> Any:
            # A client of its own: tritonclient's HTTP client serves the thread it was made on.
            caller = module.InferenceServerClient(
                server.http_url if protocol == "http" else server.grpc_url
            )
            item = module.InferInput("INPUT0", [1024], "FP32")
            item.set_shared_memory(region, data.nbytes)
            try:
                return caller.infer("held", [item])
            finally:
                caller.close()

        try:
            region, key, handle = regions.make(data.nbytes)
            shm.set_shared_memory_region(handle, [data])
            controls.hang.set()
            ran = len(controls.batches)  # the warm-up's
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(request, region)
                while len(controls.batches) == ran:  # the engine holds it, input unread
                    time.sleep(0.01)
                os.truncate(f"/dev/shm/{key.lstrip('/')}", 0)
                controls.hang.clear()
                with pytest.raises(InferenceServerException) as info:
                    answer.result(timeout=30)
            assert _bad(str(info.value.status())), info.value
            assert "truncated while a request used it" in info.value.message()
            # Grown back, the region is still refused: its pages are not the client's now.
            os.truncate(f"/dev/shm/{key.lstrip('/')}", data.nbytes)
            shm.set_shared_memory_region(handle, [data])
            with pytest.raises(InferenceServerException, match="register it again"):
                request(region)
            connection.unregister_system_shared_memory(region)
            connection.register_system_shared_memory(region, key, data.nbytes)
            np.testing.assert_array_equal(request(region).as_numpy("OUTPUT0"), data)
        finally:
            regions.close()
