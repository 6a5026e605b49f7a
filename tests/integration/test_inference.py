"""Inference through tritonclient, HTTP and gRPC, sync and asyncio, every datatype."""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio

from tests.conftest import ServerProcess

CLIENTS = {"http": httpclient, "grpc": grpcclient}

IDENTITY_DATA = {
    "bool": ("BOOL", np.array([[True, False, True]])),
    "uint8": ("UINT8", np.array([[0, 7, 255]], dtype=np.uint8)),
    "uint16": ("UINT16", np.array([[0, 7, 65535]], dtype=np.uint16)),
    "uint32": ("UINT32", np.array([[0, 7, 2**32 - 1]], dtype=np.uint32)),
    "uint64": ("UINT64", np.array([[0, 7, 2**64 - 1]], dtype=np.uint64)),
    "int8": ("INT8", np.array([[-128, 0, 127]], dtype=np.int8)),
    "int16": ("INT16", np.array([[-32768, 0, 32767]], dtype=np.int16)),
    "int32": ("INT32", np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32)),
    "int64": ("INT64", np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64)),
    "fp16": ("FP16", np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16)),
    "fp32": ("FP32", np.array([[-1.5, 0.0, 3.25e38]], dtype=np.float32)),
    "fp64": ("FP64", np.array([[-1.5, 0.0, 1e300]], dtype=np.float64)),
    "bytes": ("BYTES", np.array([[b"hello", b"", "\u00e9t\u00e9".encode()]], dtype=np.object_)),
}


def url(server: ServerProcess, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def simple_inputs(module, batch: int = 1):  # type: ignore[no-untyped-def]
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 3, dtype=np.int32)
    inputs = [
        module.InferInput("INPUT0", [batch, 16], "INT32"),
        module.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return a, b, inputs


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch", [1, 8])
def test_simple_add_sub(server: ServerProcess, protocol: str, batch: int) -> None:
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(url(server, protocol))
    a, b, inputs = simple_inputs(module, batch)
    result = client.infer("simple", inputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    if protocol == "http":
        assert response["id"] == "req-7"
        assert response["model_version"] == "1"
    else:
        assert response.id == "req-7"
        assert response.model_version == "1"


@pytest.mark.parametrize("binary", [True, False])
def test_http_json_and_binary_both_ways(server: ServerProcess, binary: bool) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    a, b, inputs = simple_inputs(httpclient, 2)
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=not binary)
    outputs = [httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    result = client.infer("simple", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None, "only the requested output comes back"
    entry = result.get_output("OUTPUT1")
    assert ("data" in entry) is (not binary)


def test_nonbatching_model(server: ServerProcess) -> None:
    for module, address in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(address)
        a = np.arange(16, dtype=np.int32)
        inputs = [
            module.InferInput("INPUT0", [16], "INT32"),
            module.InferInput("INPUT1", [16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a)
        result = client.infer("simple_nobatch", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("kind", sorted(IDENTITY_DATA))
def test_identity_every_datatype(server: ServerProcess, protocol: str, kind: str) -> None:
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(url(server, protocol))
    datatype, data = IDENTITY_DATA[kind]
    item = module.InferInput("INPUT0", list(data.shape), datatype)
    item.set_data_from_numpy(data)
    result = client.infer(f"identity_{kind}", [item])
    out = result.as_numpy("OUTPUT0")
    assert out.shape == data.shape
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("kind", sorted(k for k in IDENTITY_DATA if k not in ("fp16",)))
def test_http_json_tensors_every_datatype(server: ServerProcess, kind: str) -> None:
    """JSON (non-binary) inputs and outputs, as a client without the extension sends them."""
    client = httpclient.InferenceServerClient(server.http_url)
    datatype, data = IDENTITY_DATA[kind]
    item = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    item.set_data_from_numpy(data, binary_data=False)
    result = client.infer(
        f"identity_{kind}",
        [item],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)],
    )
    out = result.as_numpy("OUTPUT0")
    if kind == "bytes":
        assert [x if isinstance(x, bytes) else x.encode() for x in out.reshape(-1)] == list(
            data.reshape(-1)
        )
    else:
        np.testing.assert_array_equal(out, data)


def test_grpc_typed_contents(server: ServerProcess) -> None:
    """Inputs in InferTensorContents instead of raw bytes, as other KServe clients send."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="simple", id="typed")
    for name, values in (("INPUT0", list(range(16))), ("INPUT1", [2] * 16)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(values)
    response = stub.ModelInfer(request)
    out = np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
    np.testing.assert_array_equal(out, np.arange(16) + 2)
    assert response.id == "typed"
    channel.close()


def test_convnet_from_pytorch_without_config(server: ServerProcess) -> None:
    """The exported network is served with a config completed from the graph."""
    client = httpclient.InferenceServerClient(server.http_url)
    config = client.get_model_config("convnet")
    assert config["max_batch_size"] == 4
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["instance_group"][0]["count"] == 1
    assert config["input"][0]["dims"] == [3, 32, 32]
    assert config["output"][0]["dims"] == [10]
    image = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    item = httpclient.InferInput("image", list(image.shape), "FP32")
    item.set_data_from_numpy(image)
    logits = client.infer("convnet", [item]).as_numpy("logits")
    assert logits.shape == (3, 10)
    assert np.isfinite(logits).all()
    single = httpclient.InferInput("image", [1, 3, 32, 32], "FP32")
    single.set_data_from_numpy(image[1:2])
    np.testing.assert_allclose(
        client.infer("convnet", [single]).as_numpy("logits"), logits[1:2], rtol=1e-4, atol=1e-5
    )


def test_asyncio_clients(server: ServerProcess) -> None:
    async def run() -> None:
        http = httpaio.InferenceServerClient(server.http_url)
        grpc_client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            _, _, http_inputs = simple_inputs(httpaio, 2)
            _, _, grpc_inputs = simple_inputs(grpcaio, 2)
            results = await asyncio.gather(
                *[http.infer("simple", http_inputs) for _ in range(16)],
                *[grpc_client.infer("simple", grpc_inputs) for _ in range(16)],
            )
            for result in results:
                assert result.as_numpy("OUTPUT0").shape == (2, 16)
            assert await http.is_server_ready()
            assert await grpc_client.is_model_ready("simple")
        finally:
            await http.close()
            await grpc_client.close()

    asyncio.run(run())


def test_grpc_streaming(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        a, b, inputs = simple_inputs(grpcclient)
        for i in range(10):
            client.async_stream_infer("simple", inputs, request_id=str(i))
        bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
        client.async_stream_infer("simple", [bad, inputs[1]], request_id="bad")
        seen = set()
        errors = []
        for _ in range(11):
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(str(error))
                continue
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            seen.add(result.get_response().id)
        assert seen == {str(i) for i in range(10)}
        assert len(errors) == 1 and "FP32" in errors[0]
    finally:
        client.stop_stream()


def test_http_async_infer_many(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_url, concurrency=8)
    a, b, inputs = simple_inputs(httpclient)
    pending = [client.async_infer("simple", inputs) for _ in range(64)]
    for item in pending:
        np.testing.assert_array_equal(item.get_result().as_numpy("OUTPUT0"), a + b)
    client.close()


def test_http_compressed_request_and_response(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    a, b, inputs = simple_inputs(httpclient, 4)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "simple",
            inputs,
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
