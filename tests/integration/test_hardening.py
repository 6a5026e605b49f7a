"""What an attacker can send: paths out of the repository, shapes that ask for memory the
request did not carry, deeply nested data, contradictory gRPC messages. Each gets a 400 /
INVALID_ARGUMENT at once and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer, free_port
from tests.integration.test_errors import assert_still_serving, raw_post
from tests.models import loop_model

SIMPLE_OVERRIDE = {
    "name": "simple",
    "backend": "onnxruntime",
    "max_batch_size": 8,
    "input": [
        {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]},
        {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [16]},
    ],
    "output": [
        {"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": [16]},
        {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": [16]},
    ],
}


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, example_repo: Path) -> Path:
    """A model folder outside every repository the server serves."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(example_repo / "simple", elsewhere / "simple")
    return elsewhere


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, example_repo: Path, outside: Path) -> Path:
    root = tmp_path_factory.mktemp("hardening") / "repo"
    root.mkdir()
    for name in ("simple", "identity_bytes", "identity_fp32"):
        shutil.copytree(example_repo / name, root / name)
    (root / "loop" / "1").mkdir(parents=True)
    onnx.save(loop_model(), str(root / "loop" / "1" / "model.onnx"))
    (root / "loop" / "config.pbtxt").write_text(LOOP_CONFIG)
    # A symlink inside the model folder that leads out of it.
    (root / "simple" / "1" / "link.onnx").symlink_to(outside / "simple" / "1" / "model.onnx")
    return root


LOOP_CONFIG = """backend: "onnxruntime"
max_batch_size: 0
input [{ name: "COUNT" data_type: TYPE_INT64 dims: [1] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [1] }]
parameters { key: "execution_timeout_us" value: { string_value: "300000" } }
"""


@pytest.fixture(scope="module")
def explicit(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with InProcessServer.live(
        [repo],
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        log_path=tmp_path_factory.mktemp("log") / "hardening.log",
    ) as proc:
        yield proc


def _config_with(**fields: object) -> str:
    return json.dumps({**SIMPLE_OVERRIDE, **fields})


def _grpc_load_status(server: InProcessServer, config: str) -> tuple[grpc.StatusCode, str]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.load_model("simple", config=config)
    except InferenceServerException as exc:
        return grpc.StatusCode[str(exc.status()).removeprefix("StatusCode.")], exc.message()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"default_model_filename": "../../../elsewhere/1/model.onnx"}, "default_model_filename"),
        ({"default_model_filename": "/etc/passwd"}, "default_model_filename"),
        ({"default_model_filename": "link.onnx"}, "default_model_filename"),
        (
            {
                "model_warmup": [
                    {
                        "name": "w",
                        "batch_size": 1,
                        "inputs": {
                            "INPUT0": {
                                "data_type": "TYPE_INT32",
                                "dims": [16],
                                "input_data_file": "../../../../etc/hostname",
                            },
                            "INPUT1": {"data_type": "TYPE_INT32", "dims": [16], "zero_data": True},
                        },
                    }
                ]
            },
            "input_data_file",
        ),
        ({"parameters": {"engine_calibration": {"string_value": "../../"}}}, "engine_calibration"),
        ({"parameters": {"engine_calibration": {"string_value": "/tmp"}}}, "engine_calibration"),
    ],
)
def test_config_paths_outside_the_model_folder_are_refused(
    explicit: InProcessServer, outside: Path, fields: dict, field_name: str
) -> None:
    if fields.get("default_model_filename", "").startswith("../"):
        # Point at the real model folder outside the repository, as an attacker would.
        relative = Path("..", "..", outside.name, "simple", "1", "model.onnx")
        fields = {"default_model_filename": str(relative)}
    config = _config_with(**fields)
    status, reply = raw_post(
        explicit,
        "/v2/repository/models/simple/load",
        json.dumps({"parameters": {"config": config}}).encode(),
    )
    assert status == 400, reply
    assert field_name in reply["error"]
    code, message = _grpc_load_status(explicit, config)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in message
    assert_still_serving(explicit)


def test_huge_declared_shapes_are_refused_before_any_allocation(explicit: InProcessServer) -> None:
    rss_before = psutil.Process().memory_info().rss  # the server runs in this process
    for shape in ([2**31], [2**40], [2**62, 2**62], [0, 2**62]):
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "BYTES",
                        "shape": [1, *shape],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            }
        ).encode()
        started = time.perf_counter()
        status, reply = raw_post(
            explicit,
            "/v2/models/identity_bytes/infer",
            header + struct.pack("<I", 4) + b"abcd",
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert time.perf_counter() - started < 1.0
        assert status == 400, (shape, reply)
        message = pb.ModelInferRequest(model_name="identity_bytes")
        message.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, *shape])
        message.raw_input_contents.append(struct.pack("<I", 4) + b"abcd")
        with grpc.insecure_channel(explicit.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(message, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    grown = psutil.Process().memory_info().rss - rss_before
    assert grown < 64 * 2**20
    assert_still_serving(explicit)


@pytest.mark.parametrize("depth", [3, 1000, 5000])
def test_deeply_nested_json_data_is_a_400(explicit: InProcessServer, depth: int) -> None:
    data = "[" * depth + '"x"' + "]" * depth  # json.dumps itself recurses
    body = (
        '{"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 1], "data": '
        + data
        + "}]}"
    )
    for datatype, model in (("BYTES", "identity_bytes"), ("FP32", "identity_fp32")):
        status, reply = raw_post(
            explicit, f"/v2/models/{model}/infer", body.replace("BYTES", datatype).encode()
        )
        assert status == 400, reply


def test_ragged_json_data_is_a_400(explicit: InProcessServer) -> None:
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "BYTES",
                "shape": [2, 2],
                "data": [["a"], ["b", "c", "d"]],
            }
        ]
    }
    status, reply = raw_post(explicit, "/v2/models/identity_bytes/infer", json.dumps(body).encode())
    assert status == 400
    assert "INPUT0" in reply["error"]
    body["inputs"][0]["data"] = [["a", "b"], ["c", "d"]]
    status, reply = raw_post(explicit, "/v2/models/identity_bytes/infer", json.dumps(body).encode())
    assert status == 200, reply
    assert reply["outputs"][0]["data"] == ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def workers(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """The same repository served through two gRPC worker processes."""
    with InProcessServer.live(
        [repo],
        "--grpc-workers",
        "2",
        grpc_port=free_port(),
        log_path=tmp_path_factory.mktemp("log") / "workers.log",
    ) as proc:
        yield proc


@pytest.fixture(params=["in-process", "workers"])
def grpc_server(
    request: pytest.FixtureRequest, explicit: InProcessServer, workers: InProcessServer
) -> InProcessServer:
    return explicit if request.param == "in-process" else workers


def test_typed_and_raw_contents_together_are_invalid(grpc_server: InProcessServer) -> None:
    explicit = grpc_server
    message = pb.ModelInferRequest(model_name="identity_fp32")
    tensor = message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    tensor.contents.fp32_contents.append(1.0)
    message.raw_input_contents.append(np.ones(1, np.float32).tobytes())
    with grpc.insecure_channel(explicit.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(message, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents" in info.value.details()


def _stream_messages(good: bytes, count: int) -> Iterator[bytes]:
    for index in range(count):
        yield good
        if index == count // 2:
            yield b"\xff\xff\xff\xff not a protobuf message"


def test_undecodable_stream_message_is_reported(grpc_server: InProcessServer) -> None:
    """Every reply due before the bad message arrives, then the stream reports the error
    (it used to end with OK and drop the replies still due)."""
    explicit = grpc_server
    message = pb.ModelInferRequest(model_name="identity_fp32", id="good")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    message.raw_input_contents.append(np.ones(1, np.float32).tobytes())
    good = message.SerializeToString()
    with grpc.insecure_channel(explicit.grpc_url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(_stream_messages(good, 6), timeout=30)
        replies = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in call:
                replies.append(reply)
    errors = [r for r in replies if r.error_message]
    answered = [r for r in replies if not r.error_message]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert len(answered) >= 4, replies  # all those sent before the bad message
    assert not errors
    assert_still_serving(explicit)


def test_a_burst_of_grpc_calls_ends_ok_never_cancelled(explicit: InProcessServer) -> None:
    """grpc-core cancelled calls it held before the server took them (a burst of 3,000
    ended 2-14% CANCELLED); every call must end OK or with an explicit overload status."""
    message = pb.ModelInferRequest(model_name="identity_fp32")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    message.raw_input_contents.append(np.ones(1, np.float32).tobytes())

    async def burst() -> Counter[str]:
        async with grpc.aio.insecure_channel(explicit.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(message)

            async def one() -> str:
                try:
                    await stub.ModelInfer(message, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    return str(exc.code().name)
                return "OK"

            return Counter(await asyncio.gather(*(one() for _ in range(4000))))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {"OK", "UNAVAILABLE"}, statuses
    assert statuses["OK"] > 0


def test_a_hung_execution_fails_its_request_and_the_instance_is_replaced(
    explicit: InProcessServer,
) -> None:
    client = httpclient.InferenceServerClient(explicit.http_url, network_timeout=60)

    def run(count: int) -> float:
        item = httpclient.InferInput("COUNT", [1], "INT64")
        item.set_data_from_numpy(np.array([count], np.int64))
        return float(client.infer("loop", [item]).as_numpy("OUTPUT0")[0])

    assert run(5) == 5.0
    for _ in range(2):
        started = time.perf_counter()
        with pytest.raises(InferenceServerException, match="execution_timeout_us") as info:
            run(2**62)
        assert info.value.status() == "500"
        assert time.perf_counter() - started < 10
        # The replacement instance serves the next request (it waits for it if need be).
        assert run(7) == 7.0
    assert "replacing it" in explicit.log()
    stats = client.get_inference_statistics("loop")["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] == 2
    assert_still_serving(explicit)


@pytest.fixture(scope="module")
def limited(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A server with tight HTTP limits, so that each can be seen to act within seconds."""
    with InProcessServer.live(
        [repo],
        "--http-max-header-size",
        "8192",
        "--http-header-timeout-secs",
        "1",
        "--http-body-timeout-secs",
        "1",
        "--http-keepalive-timeout-secs",
        "1.5",
        "--http-max-connections",
        "40",
        log_path=tmp_path_factory.mktemp("log") / "limited.log",
    ) as proc:
        yield proc


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_oversized_headers_get_431(limited: InProcessServer) -> None:
    for head in (
        b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # one chunk, whole
        b"GET /v2 HTTP/1.1\r\n" + b"X-Many: b\r\n" * 2000 + b"\r\n",
    ):
        with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as sock:
            sock.sendall(head)
            assert _read_until_closed(sock, 10).startswith(b"HTTP/1.1 431")
    # 16 MB of headers, sent in pieces: refused long before the end (what the kernel's
    # socket buffers took before the close came back is all that gets through).
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nX-Endless: ")
        sent = 0
        with pytest.raises(OSError):
            while sent < 16 * 2**20:
                sock.sendall(b"c" * 65536)
                sent += 65536
        assert sent < 8 * 2**20
    assert_still_serving(limited)


def test_slow_requests_get_408_and_idle_connections_close(limited: InProcessServer) -> None:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as headers:
        headers.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n")
        with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as body:
            body.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
            assert _read_until_closed(headers, 10).startswith(b"HTTP/1.1 408")
            assert _read_until_closed(body, 10).startswith(b"HTTP/1.1 408")
    assert time.perf_counter() - started < 5
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as idle:
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.perf_counter()
        reply = _read_until_closed(idle, 10)
        assert reply.startswith(b"HTTP/1.1 200")
        assert 1.0 < time.perf_counter() - started < 5  # closed by the keep-alive timeout


def test_connections_past_the_cap_are_refused_and_the_others_served(
    limited: InProcessServer,
) -> None:
    held = [socket.create_connection(("127.0.0.1", limited.http_port)) for _ in range(45)]
    try:
        refused = 0
        for sock in held[40:]:
            reply = _read_until_closed(sock, 10)
            refused += reply.startswith(b"HTTP/1.1 503")
        assert refused == 5
        for sock in held[:3]:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert_still_serving(limited)
