"""Bad input gets the protocol's status and a message naming the problem; serving goes on."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer
from tests.integration.test_inference import simple_inputs


def raw_post(
    server: InProcessServer, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        return response.status, (json.loads(payload) if payload else {})  # type: ignore[no-any-return]
    finally:
        conn.close()


def simple_json(**overrides: object) -> dict:
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
    body.update(overrides)
    return body


def assert_still_serving(server: InProcessServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    a, b, inputs = simple_inputs(httpclient)
    np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/nosuch/infer", "nosuch"),
        ("/v2/models/simple/versions/9/infer", "version '9'"),
    ],
)
def test_unknown_model_or_version_is_404(server: InProcessServer, path: str, message: str) -> None:
    status, body = raw_post(server, path, json.dumps(simple_json()).encode())
    assert status == 404
    assert message in body["error"]


def test_grpc_unknown_model_is_not_found(server: InProcessServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    _, _, inputs = simple_inputs(grpcclient)
    with pytest.raises(InferenceServerException) as info:
        client.infer("nosuch", inputs)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nosuch")
    assert info.value.status() == "StatusCode.NOT_FOUND"


BAD_REQUESTS = [
    ("missing input", simple_json(inputs=simple_json()["inputs"][:1]), "INPUT1"),
    (
        "extra input",
        simple_json(
            inputs=[
                *simple_json()["inputs"],
                {"name": "INPUT9", "datatype": "INT32", "shape": [1], "data": [1]},
            ]
        ),
        "INPUT9",
    ),
    (
        "wrong datatype",
        simple_json(
            inputs=[
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16},
                simple_json()["inputs"][1],
            ]
        ),
        "INPUT0",
    ),
    (
        "wrong shape",
        simple_json(
            inputs=[
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 15], "data": [0] * 15},
                simple_json()["inputs"][1],
            ]
        ),
        "INPUT0",
    ),
    (
        "batch over max",
        simple_json(
            inputs=[
                {"name": n, "datatype": "INT32", "shape": [9, 16], "data": [0] * 144}
                for n in ("INPUT0", "INPUT1")
            ]
        ),
        "batch-size must be <= 8",
    ),
    (
        "data length",
        simple_json(
            inputs=[
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 15},
                simple_json()["inputs"][1],
            ]
        ),
        "INPUT0",
    ),
    (
        "unknown datatype",
        simple_json(
            inputs=[{"name": "INPUT0", "datatype": "FLOAT", "shape": [1, 16], "data": [0] * 16}]
        ),
        "FLOAT",
    ),
    (
        "bad data type in JSON",
        simple_json(
            inputs=[
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": ["x"] * 16},
                simple_json()["inputs"][1],
            ]
        ),
        "INPUT0",
    ),
    (
        "value out of range",
        simple_json(
            inputs=[
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [2**40] * 16},
                simple_json()["inputs"][1],
            ]
        ),
        "INPUT0",
    ),
    (
        "negative dim",
        simple_json(
            inputs=[{"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16], "data": [0] * 16}]
        ),
        "INPUT0",
    ),
    ("unknown output", simple_json(outputs=[{"name": "OUTPUT7"}]), "OUTPUT7"),
    ("inputs not a list", {"inputs": "nope"}, "inputs"),
    (
        "mismatched batch",
        simple_json(
            inputs=[
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16},
                {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [0] * 32},
            ]
        ),
        "batch size",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_json_requests_are_400(
    server: InProcessServer, case: str, body: dict, message: str
) -> None:
    status, reply = raw_post(server, "/v2/models/simple/infer", json.dumps(body).encode())
    assert status == 400, reply
    assert message in reply["error"]
    assert_still_serving(server)


def test_malformed_json_is_400(server: InProcessServer) -> None:
    status, reply = raw_post(server, "/v2/models/simple/infer", b'{"inputs": [')
    assert status == 400 and "JSON" in reply["error"]
    status, reply = raw_post(server, "/v2/models/simple/infer", b"[1, 2]")
    assert status == 400


def test_binary_framing_errors_are_400(server: InProcessServer) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                },
                {
                    "name": "INPUT1",
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                },
            ]
        }
    ).encode()
    data = np.zeros(32, np.int32).tobytes()
    cases = [
        (header + data[:-4], len(header), "past the end"),
        (header + data + b"xx", len(header), "binary data after"),
        (header + data, len(header) + 1000, "outside the body"),
        (header + data, len(header) - 3, "JSON"),
    ]
    for body, length, message in cases:
        status, reply = raw_post(
            server,
            "/v2/models/simple/infer",
            body,
            {"Inference-Header-Content-Length": str(length)},
        )
        assert status == 400, (message, reply)
        assert message in reply["error"]
    status, reply = raw_post(
        server, "/v2/models/simple/infer", header + data, {"Inference-Header-Content-Length": "abc"}
    )
    assert status == 400
    status, _ = raw_post(
        server,
        "/v2/models/simple/infer",
        header + data,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200
    assert_still_serving(server)


def test_body_over_limit_is_413_before_it_is_read(server: InProcessServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + b"x" * 1000
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    assert_still_serving(server)


def test_grpc_bad_requests_are_invalid_argument(server: InProcessServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    _, _, inputs = simple_inputs(grpcclient)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", [bad, inputs[1]])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs[:1])
    assert "INPUT1" in info.value.message()
    short = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    short._raw_content = b"\x00" * 60
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", [short, inputs[1]])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "64 bytes" in info.value.message()


def test_bad_bytes_framing(server: InProcessServer) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 9},
                },
            ]
        }
    ).encode()
    body = header + (100).to_bytes(4, "little") + b"hello"
    status, reply = raw_post(
        server,
        "/v2/models/identity_bytes/infer",
        body,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400 and "INPUT0" in reply["error"]


@pytest.mark.parametrize("name", ["..", "%2E%2E", "..%2Fsimple", "%2Fetc", ".hidden"])
def test_model_names_cannot_leave_the_repository(server: InProcessServer, name: str) -> None:
    status, reply = raw_post(server, f"/v2/models/{name}/infer", json.dumps(simple_json()).encode())
    assert status in (400, 404)
    assert "error" in reply


def test_unknown_routes_and_methods(server: InProcessServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/v3/nothing")
    response = conn.getresponse()
    assert response.status == 404 and "error" in json.loads(response.read())
    conn.request("GET", "/v2/models/simple/infer")
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    response.read()
    conn.close()


def test_garbage_on_the_socket(server: InProcessServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    assert_still_serving(server)
