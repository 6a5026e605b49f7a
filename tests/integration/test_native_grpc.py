"""What the native gRPC frontend (enginehouse's own HTTP/2 layer, the default) has to get
right beyond the protocol tests every frontend passes: flow control for messages larger than
the client's windows, many calls on one connection, the message size limit, restricted APIs
and unknown methods, and the calls under way when the server stops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer
from tests.integration.test_inference import simple_inputs

NATIVE = ("--grpc-frontend", "native")


@pytest.fixture(scope="module")
def server(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """The example repository behind the native gRPC frontend."""
    with InProcessServer.live(
        [example_repo], *NATIVE, log_path=tmp_path_factory.mktemp("log") / "native.log"
    ) as proc:
        yield proc


def test_tensors_larger_than_every_window(server: InProcessServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for size in (1, 16_384, 262_144, 4 << 20):
        data = np.random.default_rng(size).standard_normal((1, size)).astype(np.float32)
        item = grpcclient.InferInput("INPUT0", [1, size], "FP32")
        item.set_data_from_numpy(data)
        result = client.infer("identity_fp32", [item])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_many_concurrent_calls_on_one_connection(server: InProcessServer) -> None:
    async def run() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(server.grpc_url)
        try:
            calls = []
            for i in range(300):
                a = np.full((1, 16), i, np.int32)
                inputs = [aioclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
                for item in inputs:
                    item.set_data_from_numpy(a)
                calls.append(client.infer("simple", inputs))
            results = await asyncio.gather(*calls)
            return [r.as_numpy("OUTPUT0") for r in results]
        finally:
            await client.close()

    for i, total in enumerate(asyncio.run(run())):
        assert np.all(total == 2 * i)


def test_messages_over_the_limit_are_refused(example_repo: Path) -> None:
    with InProcessServer.live([example_repo], *NATIVE, "--http-max-input-size", "4096") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        item = grpcclient.InferInput("INPUT0", [1, 4096], "FP32")
        item.set_data_from_numpy(np.zeros((1, 4096), np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("identity_fp32", [item])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        _, _, inputs = simple_inputs(grpcclient)
        assert client.infer("simple", inputs).as_numpy("OUTPUT0") is not None


def test_restricted_apis_and_unknown_methods(example_repo: Path) -> None:
    with InProcessServer.live(
        [example_repo], *NATIVE, "--grpc-restricted-protocol", "model-repository:admin=yes"
    ) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            client.get_model_repository_index()
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        assert client.get_model_repository_index(headers={"admin": "yes"}).models
        with pytest.raises(InferenceServerException) as info:
            client.get_trace_settings()
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        assert client.is_server_live()


def test_stopping_finishes_the_calls_under_way(tmp_path: Path) -> None:
    from enginehouse.testing import fake_backend

    fake_backend.write_model(tmp_path, "slow", count=2)
    server = InProcessServer([tmp_path], *NATIVE)
    server.wait_live()
    fake_backend.controls("slow").latency_s = 0.3

    async def run() -> list[object]:
        client = aioclient.InferenceServerClient(server.grpc_url)
        try:
            calls = []
            for i in range(6):
                item = aioclient.InferInput("INPUT0", [1, 4], "FP32")
                item.set_data_from_numpy(np.full((1, 4), i, np.float32))
                calls.append(asyncio.ensure_future(client.infer("slow", [item])))
            await asyncio.sleep(0.1)
            stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
            results = await asyncio.gather(*calls, return_exceptions=True)
            await stopping
            return [r if isinstance(r, Exception) else r.as_numpy("OUTPUT0")[0, 0] for r in results]
        finally:
            await client.close()

    answers = asyncio.run(run())
    assert answers == [float(i) for i in range(6)], [str(a) for a in answers]
    assert server.exited()
