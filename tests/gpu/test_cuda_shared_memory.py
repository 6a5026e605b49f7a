"""Triton's CUDA shared-memory extension with tritonclient's own ``cuda_shared_memory``
utilities: device buffers made by the client (this process), opened by the server (a child
process: an IPC handle cannot be opened by the process that made it), for a CPU model and
for a GPU model with two instances, over both protocols (its inputs copied device to device
into the engine's buffers); one allocation registered by two clients under two names; a
region unregistered while requests bound for it run; system regions read by a GPU model,
pinned and unpinned, and a pinned one truncated (skipped without a GPU)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from enginehouse.backends import host_copies
from enginehouse.testing import ServerProcess
from tests.models import torch_convnet

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
try:
    import tritonclient.utils.cuda_shared_memory as cudashm
except RuntimeError as missing:  # tritonclient raises this without cuda-python
    pytest.skip(str(missing), allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from make_repository import make_repository  # noqa: E402

GPU_CONFIG = """name: "gpu_net"
backend: "pytorch"
max_batch_size: 8
input [{ name: "image" data_type: TYPE_FP32 dims: [3, 16, 16] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [10] }]
instance_group [{ count: 2 kind: KIND_GPU gpus: [0] }]
dynamic_batching { max_queue_delay_microseconds: 500 }
parameters { key: "engine_precision" value: { string_value: "fp16" } }
"""
# An fp16 engine: its FP32 image rows from request bodies are staged as FP16 and widened on
# the device, while rows from regions are copied in as FP32; batches mix the two.
PROTOCOLS = [pytest.param(httpclient, id="http"), pytest.param(grpcclient, id="grpc")]


def net() -> torch.nn.Module:
    return torch_convnet(16)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("cudashm")
    repo = make_repository(root / "repo")
    (repo / "gpu_net" / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(net(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / "gpu_net" / "1" / "model.pt2"))
    (repo / "gpu_net" / "config.pbtxt").write_text(GPU_CONFIG)
    with ServerProcess(
        [repo], "--engine-cache", str(root / "cache"), log_path=root / "serve.log"
    ) as server:
        server.wait_live(timeout_s=900)
        yield server


class DeviceRegions:
    """CUDA regions this test made and registered; unregistered and freed after it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.handles: list[Any] = []

    def make(self, name: str, data: np.ndarray | None = None, byte_size: int = 0) -> Any:
        size = byte_size or (data.nbytes if data is not None else 0)
        handle = cudashm.create_shared_memory_region(name, size, 0)
        self.handles.append(handle)
        if data is not None:
            cudashm.set_shared_memory_region(handle, [data])
        self.client.register_cuda_shared_memory(name, cudashm.get_raw_handle(handle), 0, size)
        return handle

    def close(self) -> None:
        self.client.unregister_cuda_shared_memory()
        for handle in self.handles:
            cudashm.destroy_shared_memory_region(handle)


def wait_until(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def in_threads(run: Any, count: int) -> None:
    """``run(i)`` for i in 0..count-1, each on a thread of its own, all at once."""
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def close_to(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.abs(got - want).max() / np.abs(want).max() <= 1e-2)


def client_for(module: Any, server: ServerProcess) -> Any:
    url = server.http_url if module is httpclient else server.grpc_url
    return module.InferenceServerClient(url)


@pytest.mark.parametrize("module", PROTOCOLS)
def test_cpu_model_reads_and_writes_device_regions(module: Any, served: ServerProcess) -> None:
    client = client_for(module, served)
    regions = DeviceRegions(client)
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 5, dtype=np.int32)
        inputs = []
        for name, data in (("INPUT0", a), ("INPUT1", b)):
            regions.make(f"in_{name}_{module.__name__}", data)
            item = module.InferInput(name, [1, 16], "INT32")
            item.set_shared_memory(f"in_{name}_{module.__name__}", data.nbytes)
            inputs.append(item)
        out = regions.make(f"out_{module.__name__}", byte_size=2 * a.nbytes)
        outputs = []
        for index, name in enumerate(("OUTPUT0", "OUTPUT1")):
            requested = module.InferRequestedOutput(name)
            requested.set_shared_memory(f"out_{module.__name__}", a.nbytes, offset=index * 64)
            outputs.append(requested)
        client.infer("simple", inputs, outputs=outputs)
        total, difference = cudashm.get_contents_as_numpy(out, np.int32, [2, 16])
        np.testing.assert_array_equal(total, (a + b)[0])
        np.testing.assert_array_equal(difference, (a - b)[0])

        status = client.get_cuda_shared_memory_status()
        names = {entry["name"] for entry in status} if module is httpclient else set(status.regions)
        assert f"out_{module.__name__}" in names
        metadata = client.get_server_metadata()
        extensions = metadata["extensions"] if module is httpclient else metadata.extensions
        assert "cuda_shared_memory" in extensions

        # Past the allocation: refused at registration and per request, serving goes on.
        with pytest.raises(InferenceServerException, match="more than"):
            client.register_cuda_shared_memory("too_big", cudashm.get_raw_handle(out), 0, 1 << 30)
        bad = module.InferRequestedOutput("OUTPUT0")
        bad.set_shared_memory(f"out_{module.__name__}", a.nbytes, offset=100)
        with pytest.raises(InferenceServerException, match="runs past"):
            client.infer("simple", inputs, outputs=[bad])
    finally:
        regions.close()
    assert served.exited() is False


def test_gpu_model_two_instances_one_allocation_two_clients(served: ServerProcess) -> None:
    """Both protocols register one device allocation of images under two names; eight
    threads infer through them into per-thread output regions at once."""
    http = client_for(httpclient, served)
    grpc = client_for(grpcclient, served)
    http_regions, grpc_regions = DeviceRegions(http), DeviceRegions(grpc)
    rows = 2
    images = np.random.default_rng(0).standard_normal((8, rows, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net()(torch.from_numpy(images.reshape(-1, 3, 16, 16))).numpy().reshape(8, rows, 10)
    errors: list[str] = []
    try:
        shared = http_regions.make("images_http", images)
        grpc.register_cuda_shared_memory(
            "images_grpc", cudashm.get_raw_handle(shared), 0, images.nbytes
        )
        outputs = [
            (http_regions if i % 2 else grpc_regions).make(f"logits_{i}", byte_size=rows * 40)
            for i in range(8)
        ]
        one = images[0].nbytes

        def run(i: int) -> None:
            module = httpclient if i % 2 else grpcclient
            client = client_for(module, served)
            item = module.InferInput("image", [rows, 3, 16, 16], "FP32")
            item.set_shared_memory("images_http" if i % 2 else "images_grpc", one, offset=i * one)
            requested = module.InferRequestedOutput("logits")
            requested.set_shared_memory(f"logits_{i}", rows * 40)
            for _ in range(20):
                try:
                    client.infer("gpu_net", [item], outputs=[requested])
                except InferenceServerException as exc:
                    errors.append(f"{i}: {exc}")

        in_threads(run, 8)
        assert errors == []
        for i, handle in enumerate(outputs):
            assert close_to(cudashm.get_contents_as_numpy(handle, np.float32, [rows, 10]), want[i])

        # One name gone, the other still reads the allocation.
        http.unregister_cuda_shared_memory("images_http")
        item = grpcclient.InferInput("image", [rows, 3, 16, 16], "FP32")
        item.set_shared_memory("images_grpc", one)
        assert close_to(grpc.infer("gpu_net", [item]).as_numpy("logits"), want[0])
        stats = grpc.get_inference_statistics("gpu_net").model_stats[0]
        assert stats.inference_stats.success.count >= 161
    finally:
        grpc_regions.close()
        http_regions.close()


def test_device_regions_and_request_bodies_batched_together(served: ServerProcess) -> None:
    """Half the threads send their image in a CUDA region (copied device to device into the
    engine's input buffer), half in the request (through the staging buffer): the batches
    formed mix both, and every answer is its own image's."""
    grpc = client_for(grpcclient, served)
    regions = DeviceRegions(grpc)
    images = np.random.default_rng(2).standard_normal((8, 1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net()(torch.from_numpy(images.reshape(-1, 3, 16, 16))).numpy()
    errors: list[str] = []
    wrong: list[int] = []
    try:
        regions.make("mixed_images", images)
        one = images[0].nbytes

        def run(i: int) -> None:
            client = client_for(grpcclient, served)
            item = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
            if i % 2:
                item.set_data_from_numpy(images[i])
            else:
                item.set_shared_memory("mixed_images", one, offset=i * one)
            for _ in range(30):
                try:
                    got = client.infer("gpu_net", [item]).as_numpy("logits")
                except InferenceServerException as exc:
                    errors.append(f"{i}: {exc}")
                    continue
                if not close_to(got[0], want[i]):
                    wrong.append(i)

        in_threads(run, 8)
        assert errors == []
        assert wrong == []
    finally:
        regions.close()


def test_outputs_into_device_regions_batched_with_answers_in_the_response(
    served: ServerProcess,
) -> None:
    """Half the threads have their logits written into their own part of one CUDA region
    (copied there on the device from the engine's output buffer), half get them in the
    response: the batches formed mix both, and every answer is its own image's. An output
    part smaller than the logits is a 400 naming the region, and nothing is written."""
    grpc = client_for(grpcclient, served)
    regions = DeviceRegions(grpc)
    images = np.random.default_rng(3).standard_normal((8, 1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net()(torch.from_numpy(images.reshape(-1, 3, 16, 16))).numpy()
    errors: list[str] = []
    wrong: list[int] = []
    try:
        logits = regions.make("mixed_logits", byte_size=8 * 40)

        def run(i: int) -> None:
            client = client_for(grpcclient, served)
            item = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
            item.set_data_from_numpy(images[i])
            requested = grpcclient.InferRequestedOutput("logits")
            if i % 2 == 0:
                requested.set_shared_memory("mixed_logits", 40, offset=i * 40)
            for _ in range(30):
                try:
                    result = client.infer("gpu_net", [item], outputs=[requested])
                except InferenceServerException as exc:
                    errors.append(f"{i}: {exc}")
                    continue
                if i % 2:
                    got = result.as_numpy("logits")[0]
                else:
                    named = result.get_output("logits").parameters["shared_memory_region"]
                    if named.string_param != "mixed_logits":
                        errors.append(f"{i}: the answer names region {named.string_param!r}")
                    got = cudashm.get_contents_as_numpy(logits, np.float32, [8, 10])[i]
                if not close_to(got, want[i]):
                    wrong.append(i)

        in_threads(run, 8)
        assert errors == []
        assert wrong == []

        before = cudashm.get_contents_as_numpy(logits, np.float32, [8, 10]).copy()
        item = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
        item.set_data_from_numpy(images[1])
        short = grpcclient.InferRequestedOutput("logits")
        short.set_shared_memory("mixed_logits", 39, offset=40)
        with pytest.raises(InferenceServerException) as refused:
            grpc.infer("gpu_net", [item], outputs=[short])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "mixed_logits" in refused.value.message()
        after = cudashm.get_contents_as_numpy(logits, np.float32, [8, 10])
        np.testing.assert_array_equal(after, before)
    finally:
        regions.close()


def test_a_region_unregistered_while_requests_run(served: ServerProcess) -> None:
    """Requests whose output region goes away meanwhile fail with a 400 naming it; the others
    are answered; the server keeps serving."""
    grpc = client_for(grpcclient, served)
    regions = DeviceRegions(grpc)
    image = np.ones((1, 3, 16, 16), np.float32)
    outcomes: list[str] = []
    try:
        regions.make("still_in", image)
        regions.make("going_out", byte_size=40)
        stop = threading.Event()

        def run() -> None:
            client = client_for(grpcclient, served)
            while not stop.is_set():
                item = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
                item.set_shared_memory("still_in", image.nbytes)
                requested = grpcclient.InferRequestedOutput("logits")
                requested.set_shared_memory("going_out", 40)
                try:
                    client.infer("gpu_net", [item], outputs=[requested])
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(f"{exc.status()} {exc.message()}")

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: outcomes.count("ok") >= 20)
        grpc.unregister_cuda_shared_memory("going_out")
        counted = len(outcomes)
        wait_until(lambda: len(outcomes) >= counted + 40)
        stop.set()
        for thread in threads:
            thread.join()
        refused = [o for o in outcomes if o != "ok"]
        assert refused, outcomes
        assert all(o.startswith("StatusCode.INVALID_ARGUMENT") for o in refused), refused
        assert all("going_out" in o for o in refused), refused
        assert grpc.is_server_live()
    finally:
        regions.close()


@pytest.fixture(scope="module")
def served_unpinned(
    tmp_path_factory: pytest.TempPathFactory, served: ServerProcess
) -> Iterator[ServerProcess]:
    """The same repository and engine cache served with system regions left unpinned."""
    root = tmp_path_factory.mktemp("unpinned")
    repo = Path(served.repositories[0])
    cache = repo.parent / "cache"
    with ServerProcess(
        [repo],
        "--engine-cache",
        str(cache),
        "--pin-shared-memory",
        "false",
        log_path=root / "serve.log",
    ) as server:
        server.wait_live(timeout_s=900)
        yield server


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "staged"])
def test_gpu_model_reads_system_regions(pinned: bool, request: pytest.FixtureRequest) -> None:
    """Images in system shared memory, batched with images in request bodies: pinned, each
    region's image is copied to the device by DMA when its batch launches; unpinned, it is
    read from the region straight into the instance's pinned staging rows."""
    import tritonclient.utils.shared_memory as shm

    server: ServerProcess = request.getfixturevalue("served" if pinned else "served_unpinned")
    grpc = client_for(grpcclient, server)
    images = np.random.default_rng(1).standard_normal((8, 1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net()(torch.from_numpy(images.reshape(-1, 3, 16, 16))).numpy()
    key = f"/eh_gpu_sys_images_{pinned}"
    handle = shm.create_shared_memory_region("sys_images", key, images.nbytes)
    errors: list[str] = []
    answers: dict[int, np.ndarray] = {}
    try:
        shm.set_shared_memory_region(handle, [images])
        grpc.register_system_shared_memory("sys_images", key, images.nbytes)
        assert ("region 'sys_images' pinned for GPU models" in server.log()) is pinned
        staged_half = "model 'gpu_net': FP32 inputs staged as FP16" in server.log()
        assert staged_half is host_copies.HALF_STAGING  # where the conversion is built
        one = images[0].nbytes

        def run(i: int) -> None:
            client = client_for(grpcclient, server)
            item = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
            if i % 2:
                item.set_data_from_numpy(images[i])
            else:
                item.set_shared_memory("sys_images", one, offset=i * one)
            for _ in range(10):
                try:
                    answers[i] = client.infer("gpu_net", [item]).as_numpy("logits")
                except InferenceServerException as exc:
                    errors.append(f"{i}: {exc}")

        in_threads(run, 8)
        assert errors == []
        for i in range(8):
            assert close_to(answers[i][0], want[i]), i
    finally:
        grpc.unregister_system_shared_memory("sys_images")
        shm.destroy_shared_memory_region(handle)


def test_a_pinned_region_truncated_is_a_400_and_the_server_serves_on(
    served: ServerProcess,
) -> None:
    import tritonclient.utils.shared_memory as shm

    grpc = client_for(grpcclient, served)
    image = np.ones((1, 3, 16, 16), np.float32)
    handle = shm.create_shared_memory_region("shrinking", "/eh_gpu_shrinking", image.nbytes)
    try:
        shm.set_shared_memory_region(handle, [image])
        grpc.register_system_shared_memory("shrinking", "/eh_gpu_shrinking", image.nbytes)
        item = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
        item.set_shared_memory("shrinking", image.nbytes)
        before = grpc.infer("gpu_net", [item]).as_numpy("logits")
        os.truncate("/dev/shm/eh_gpu_shrinking", 512)
        with pytest.raises(InferenceServerException, match="truncated") as refused:
            grpc.infer("gpu_net", [item])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        body = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
        body.set_data_from_numpy(image)
        np.testing.assert_allclose(
            grpc.infer("gpu_net", [body]).as_numpy("logits"), before, rtol=1e-5
        )
    finally:
        grpc.unregister_system_shared_memory("shrinking")
        shm.destroy_shared_memory_region(handle)


def test_a_server_with_no_gpu_model_keeps_device_regions_usable(tmp_path: Path) -> None:
    """Nothing but the region holds the device's context in this server: requests long
    after registration still read and write it."""
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(
        [repo], "--model-control-mode", "explicit", "--load-model", "simple"
    ) as server:
        server.wait_live()
        client = client_for(grpcclient, server)
        regions = DeviceRegions(client)
        try:
            a = np.arange(16, dtype=np.int32).reshape(1, 16)
            regions.make("only_in", np.concatenate([a, a]))
            out = regions.make("only_out", byte_size=64)
            for _ in range(3):
                time.sleep(0.5)
                inputs = []
                for index, name in enumerate(("INPUT0", "INPUT1")):
                    item = grpcclient.InferInput(name, [1, 16], "INT32")
                    item.set_shared_memory("only_in", 64, offset=index * 64)
                    inputs.append(item)
                requested = grpcclient.InferRequestedOutput("OUTPUT0")
                requested.set_shared_memory("only_out", 64)
                client.infer("simple", inputs, outputs=[requested])
                got = cudashm.get_contents_as_numpy(out, np.int32, [1, 16])
                np.testing.assert_array_equal(got, a + a)
        finally:
            regions.close()
