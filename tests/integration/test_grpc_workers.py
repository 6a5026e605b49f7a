"""gRPC served by worker processes (--grpc-workers) relaying to the core: the same protocol
as the in-process frontend, and a worker that dies is replaced."""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.clients import infer_all_at_once
from tests.conftest import ServerProcess
from tests.integration import test_inference


@pytest.fixture(scope="module", params=["native", "grpcio"])
def workers_server(
    request: pytest.FixtureRequest, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Two workers, on each of the gRPC frontends."""
    with ServerProcess.live(
        [example_repo],
        "--grpc-workers",
        "2",
        "--grpc-frontend",
        request.param,
        log_path=tmp_path_factory.mktemp("log") / "workers.log",
    ) as proc:
        yield proc


def workers(server: ServerProcess) -> list[psutil.Process]:
    """The live worker processes (a killed one is a zombie until the server reaps it)."""
    found = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if "enginehouse.frontends.grpc.worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_infer_stream_and_types_through_workers(workers_server: ServerProcess) -> None:
    assert len(workers(workers_server)) == 2
    # Every worker's request path was warmed over gRPC before the server said ready.
    log = workers_server.log()
    warmed = log.index("gRPC workers warmed:")
    assert "through each of 2 in" in log[warmed:].splitlines()[0], log
    assert warmed < log.index("server ready: yes")
    assert "warm-up failed" not in log
    for batch in (1, 8):
        test_inference.test_simple_add_sub(workers_server, "grpc", batch)
    for kind in ("fp16", "int64", "bytes", "bool"):
        test_inference.test_identity_every_datatype(workers_server, "grpc", kind)
    test_inference.test_grpc_typed_contents(workers_server)
    test_inference.test_grpc_streaming(workers_server)
    test_inference.test_asyncio_clients(workers_server)


def test_large_tensors_through_workers(workers_server: ServerProcess) -> None:
    """Megabyte tensors (cut out of the relayed message as views) come back intact, also
    many at once, side by side with small requests and a bad large one."""
    client = grpcclient.InferenceServerClient(workers_server.grpc_url)
    rng = np.random.default_rng(0)
    sent = [rng.standard_normal((1, size)).astype(np.float32) for size in (9_000, 300_000)]
    sent += [np.full((2, 150_000), i, np.float32) for i in range(6)]
    for data, got in zip(sent, infer_all_at_once(client, "identity_fp32", "INPUT0", sent)):
        np.testing.assert_array_equal(got, data)
    wrong = grpcclient.InferInput("INPUT0", [1, 300_000], "FP32")
    wrong.set_data_from_numpy(sent[1])
    wrong._input.shape[:] = [1, 300_001]  # a shape the bytes sent do not fill
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_fp32", [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    test_inference.test_simple_add_sub(workers_server, "grpc", 1)


def test_metadata_and_errors_through_workers(workers_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(workers_server.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_model_metadata("simple").name == "simple"
    assert client.get_model_config("simple").config.max_batch_size == 8
    assert {m.name for m in client.get_model_repository_index().models} >= {"simple"}
    assert client.get_inference_statistics("simple").model_stats[0].name == "simple"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    item = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    item.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", [item])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple")  # control mode none
    assert "none" in str(info.value)


def test_dead_worker_is_replaced(workers_server: ServerProcess) -> None:
    victim = workers(workers_server)[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [p for p in workers(workers_server) if p.pid != victim.pid and p.is_running()]
        if len(alive) == 2:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the dead worker was not replaced")
    time.sleep(1.0)  # the new worker binds the port
    for _ in range(20):  # new connections land on either worker
        client = grpcclient.InferenceServerClient(workers_server.grpc_url)
        a, b, inputs = test_inference.simple_inputs(grpcclient)
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        client.close()


def test_workers_exit_when_the_core_dies(example_repo: Path, tmp_path: Path) -> None:
    """A killed core must not leave workers holding the port."""
    server = ServerProcess([example_repo], "--grpc-workers", "1", log_path=tmp_path / "log")
    try:
        server.wait_live()
        (worker,) = workers(server)
        server.process.kill()
        server.process.wait()
        worker.wait(timeout=30)
    finally:
        server.stop()


def test_malformed_message_is_invalid_argument(workers_server: ServerProcess) -> None:
    import grpc

    with grpc.insecure_channel(workers_server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Large messages take the other path (tensors cut out of the frame before parsing):
        # a length past the end, a bad wire type, a valid message with garbage after it.
        valid = pb.ModelInferRequest(model_name="identity_fp32").SerializeToString()
        for garbage in (
            b"\x3a\xff\xff\xff\x0f" + bytes(100_000),  # raw contents longer than the message
            bytes([(1 << 3) | 3]) + bytes(100_000),  # wire type 3
            valid + b"\x12" + bytes(100_000),  # model_version of 0 bytes, then zero keys
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(garbage)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage[:8]
    test_inference.test_simple_add_sub(workers_server, "grpc", 1)  # still serving


def test_unsupported_extensions_through_workers(workers_server: ServerProcess) -> None:
    from tests.integration.test_endpoints import _unimplemented_rpcs

    _unimplemented_rpcs(workers_server)


def test_shared_memory_through_workers(workers_server: ServerProcess) -> None:
    """Registration and shared-memory tensors reach the core from the worker processes."""
    import tritonclient.utils.shared_memory as shm

    client = grpcclient.InferenceServerClient(workers_server.grpc_url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    handle = shm.create_shared_memory_region("w_in", "/eh_workers_in", 64)
    out = shm.create_shared_memory_region("w_out", "/eh_workers_out", 64)
    try:
        shm.set_shared_memory_region(handle, [a])
        client.register_system_shared_memory("w_in", "/eh_workers_in", 64)
        client.register_system_shared_memory("w_out", "/eh_workers_out", 64)
        inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for item in inputs:
            item.set_shared_memory("w_in", 64)
        requested = grpcclient.InferRequestedOutput("OUTPUT0")
        requested.set_shared_memory("w_out", 64)
        client.infer("simple", inputs, outputs=[requested])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.int32, [1, 16]), a + a)
        assert "w_in" in client.get_system_shared_memory_status().regions
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
        shm.destroy_shared_memory_region(out)


IDENTITY_CONFIG = """name: "identity_1m"
backend: "onnxruntime"
max_batch_size: 8
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [262144] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [262144] }]
"""


def _identity_repository(root: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 262144])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 262144])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "identity_1m" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "identity_1m" / "1" / "model.onnx"))
    (root / "identity_1m" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    return root


def _ring_traffic(log: str) -> tuple[int, int]:
    """The requests and the answers the server's stop log says came through the rings."""
    line = next(line for line in log.splitlines() if "came through the workers'" in line)
    words = line.split("gRPC relay: ")[1].split()
    return int(words[0]), int(words[5])


@pytest.mark.parametrize("frontend", ["native", "grpcio"])
def test_large_requests_come_through_the_ring_and_free_it(tmp_path: Path, frontend: str) -> None:
    """1 MB requests through one worker whose ring holds two of them at a time: forty in a
    row all come through it (so the core frees its places), eight at once fall back to the
    socket when it is full, and every answer is right."""
    repo = _identity_repository(tmp_path / "repo")
    server = ServerProcess(
        [repo],
        "--grpc-workers",
        "1",
        "--grpc-frontend",
        frontend,
        "--grpc-relay-ring-mb",
        "3",
        log_path=tmp_path / "serve.log",
    )
    rng = np.random.default_rng(0)
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for _ in range(40):
            data = rng.standard_normal((1, 262144)).astype(np.float32)
            item = grpcclient.InferInput("INPUT0", [1, 262144], "FP32")
            item.set_data_from_numpy(data)
            np.testing.assert_array_equal(
                client.infer("identity_1m", [item]).as_numpy("OUTPUT0"), data
            )
        images = [rng.standard_normal((1, 262144)).astype(np.float32) for _ in range(8)]
        for sent, got in zip(images, infer_all_at_once(client, "identity_1m", "INPUT0", images)):
            np.testing.assert_array_equal(got, sent)

        # A stream's messages are relayed one by one, through the ring as well.
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for i, image in enumerate(images[:4]):
                item = grpcclient.InferInput("INPUT0", [1, 262144], "FP32")
                item.set_data_from_numpy(image)
                client.async_stream_infer("identity_1m", [item], request_id=str(i))
            for _ in range(4):
                result, error = answers.get(timeout=30)
                assert error is None, error
                sent = images[int(result.get_response().id)]
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), sent)
        finally:
            client.stop_stream()
    finally:
        assert server.stop() == 0
    # Two warm-up requests, the forty, at least two of the eight, and the stream's four
    # (sent one after another into a ring that holds two, freed as they are answered, or
    # over the socket when it is full).
    requests, answers = _ring_traffic(server.log())
    assert requests >= 44
    assert answers >= 44  # the 1 MB answers, through the answer ring alike


def test_a_ring_too_small_for_a_request_leaves_it_on_the_socket(tmp_path: Path) -> None:
    repo = _identity_repository(tmp_path / "repo")
    server = ServerProcess(
        [repo], "--grpc-workers", "1", "--grpc-relay-ring-mb", "1", log_path=tmp_path / "serve.log"
    )
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        data = np.ones((1, 262144), np.float32)
        item = grpcclient.InferInput("INPUT0", [1, 262144], "FP32")
        item.set_data_from_numpy(data)
        for _ in range(3):
            np.testing.assert_array_equal(
                client.infer("identity_1m", [item]).as_numpy("OUTPUT0"), data
            )
    finally:
        assert server.stop() == 0
    assert _ring_traffic(server.log()) == (0, 0)
