"""Dynamic batching, queue policies, warm-up and instance replacement on a real server."""

from __future__ import annotations

import asyncio
import json
import queue
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from enginehouse.testing import fake_backend
from tests.conftest import InProcessServer
from tests.integration.test_errors import raw_post
from tests.models import (
    chain_config,
    first_rows,
    gather_table,
    loop_model,
    matmul_chain,
    save,
    scale_by_two,
    total_sum,
)

BATCHED = """backend: "onnxruntime"
max_batch_size: 32
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [4] }]
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    root = tmp_path_factory.mktemp("batching")
    save(scale_by_two(), root, "batched", BATCHED)
    save(
        scale_by_two(),
        root,
        "unbatched",
        BATCHED.replace("dynamic_batching { max_queue_delay_microseconds: 20000 }", ""),
    )
    save(
        matmul_chain(),
        root,
        "queue_small",
        chain_config(
            "dynamic_batching { max_queue_delay_microseconds: 0 "
            "default_queue_policy { max_queue_size: 2 } }\n"
        ),
    )
    # A fake model: the test sets how long its first execution holds the one instance.
    fake_backend.write_model(
        root,
        "timeouts",
        max_batch_size=64,
        dims="1024",
        extra="dynamic_batching { max_queue_delay_microseconds: 0 default_queue_policy { "
        "default_timeout_microseconds: 100000000 allow_timeout_override: true } }\n"
        # On its thread: the held execution must leave the event loop free to queue the
        # others (measured fast at warm-up, it would otherwise run on the loop).
        'parameters { key: "inline_execution" value: { string_value: "never" } }',
    )
    save(
        loop_model(batch=True),
        root,
        "prioritized",
        'backend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [{ name: "COUNT" data_type: TYPE_INT64 dims: [1] }]\n'
        'output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [1] }]\n'
        "dynamic_batching { max_queue_delay_microseconds: 0 priority_levels: 2 "
        "default_priority_level: 2 }\n"
        # On its thread: the block must leave the event loop free to queue the others.
        'parameters { key: "inline_execution" value: { string_value: "never" } }\n',
    )
    save(
        matmul_chain(),
        root,
        "ordered",
        chain_config(
            "dynamic_batching { max_queue_delay_microseconds: 0 preserve_ordering: true }\n",
            count=2,
        ),
    )
    save(
        gather_table(),
        root,
        "fragile",
        'backend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [{ name: "INDEX" data_type: TYPE_INT64 dims: [1] }]\n'
        'output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [1] }]\n'
        "dynamic_batching { }\n",
    )
    # Broken models: one drops the batch's rows past two (warmed at one row, so it loads),
    # the other returns a scalar for any batch (its default warm-up fails the load).
    warm_one_row = (
        'model_warmup [{ name: "one_row" batch_size: 1 inputs { key: "INPUT0" value: '
        "{ data_type: TYPE_FP32 dims: [4] zero_data: true } } }]\n"
    )
    save(first_rows(2), root, "first_two_rows", BATCHED + warm_one_row)
    save(
        total_sum(),
        root,
        "total_sum",
        BATCHED.replace("dims: [4] }]\ndynamic", "dims: [1] }]\ndynamic"),
    )
    server = InProcessServer(
        [root],
        "--metrics-config",
        "summary_latencies=true",
        "--instance-health-check-secs",
        "0.2",
        log_path=root / "server.log",
    )
    try:
        server.wait_live()
        yield server
    finally:
        server.stop()


def stats(server: InProcessServer, model: str) -> dict:
    client = httpclient.InferenceServerClient(server.http_url)
    return client.get_inference_statistics(model)["model_stats"][0]  # type: ignore[no-any-return]


def concurrent_grpc(
    server: InProcessServer, model: str, rows: list[np.ndarray], **kwargs: object
) -> list[object]:
    async def run() -> list[object]:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            calls = []
            for row in rows:
                item = grpcaio.InferInput("INPUT0", list(row.shape), "FP32")
                item.set_data_from_numpy(row)
                calls.append(client.infer(model, [item], **kwargs))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    return asyncio.run(run())


def test_concurrent_requests_are_merged(batching_server: InProcessServer) -> None:
    before = stats(batching_server, "batched")
    rows = [np.full((1, 4), i, np.float32) for i in range(32)]
    results = concurrent_grpc(batching_server, "batched", rows)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), 2 * i))  # type: ignore[union-attr]
    after = stats(batching_server, "batched")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 32
    assert executions < inferences / 2, (executions, inferences)
    assert any(b["batch_size"] > 1 for b in after["batch_stats"])


def test_requests_with_their_own_batch_are_merged_and_split(
    batching_server: InProcessServer,
) -> None:
    rows = [np.arange(4 * n, dtype=np.float32).reshape(n, 4) + 100 * n for n in (1, 3, 5, 2)]
    results = concurrent_grpc(batching_server, "batched", rows)
    for row, result in zip(rows, results):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), row * 2)  # type: ignore[union-attr]


def test_without_dynamic_batching_each_request_runs_alone(batching_server: InProcessServer) -> None:
    before = stats(batching_server, "unbatched")
    concurrent_grpc(batching_server, "unbatched", [np.ones((1, 4), np.float32)] * 16)
    after = stats(batching_server, "unbatched")
    assert after["execution_count"] - before["execution_count"] == 16


def test_full_queue_answers_unavailable(batching_server: InProcessServer) -> None:
    rows = [np.ones((8, 1024), np.float32)] * 12
    results = concurrent_grpc(batching_server, "queue_small", rows)
    rejected = [r for r in results if isinstance(r, InferenceServerException)]
    assert rejected, "some requests must find the queue full"
    assert all(r.status() == "StatusCode.UNAVAILABLE" for r in rejected)
    assert all("maximum queue size" in r.message() for r in rejected)
    assert any(not isinstance(r, Exception) for r in results)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [8, 1024],
                    "parameters": {"binary_data_size": 8 * 1024 * 4},
                }
            ]
        }
    ).encode()
    body = header + rows[0].tobytes()

    def post(_: int) -> int:
        status, _reply = raw_post(
            batching_server,
            "/v2/models/queue_small/infer",
            body,
            {"Inference-Header-Content-Length": str(len(header))},
        )
        return status

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(post, range(12)))
    assert 503 in outcomes and 200 in outcomes


def test_request_timeout_override_expires_in_queue(batching_server: InProcessServer) -> None:
    fake_backend.controls("timeouts").latency_s = 0.5  # the first request holds the instance
    block = np.ones((64, 1024), np.float32)
    rows = [block] + [np.ones((1, 1024), np.float32)] * 3

    async def run() -> list[object]:
        client = grpcaio.InferenceServerClient(batching_server.grpc_url)
        try:
            first = grpcaio.InferInput("INPUT0", [64, 1024], "FP32")
            first.set_data_from_numpy(block)
            calls = [asyncio.ensure_future(client.infer("timeouts", [first]))]
            await asyncio.sleep(0.05)
            for row in rows[1:]:
                item = grpcaio.InferInput("INPUT0", list(row.shape), "FP32")
                item.set_data_from_numpy(row)
                calls.append(client.infer("timeouts", [item], timeout=1000))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    results = asyncio.run(run())
    assert not isinstance(results[0], Exception)
    timed_out = [r for r in results[1:] if isinstance(r, InferenceServerException)]
    assert timed_out and all("timed out" in r.message() for r in timed_out)
    assert stats(batching_server, "timeouts")["inference_stats"]["fail"]["count"] >= len(timed_out)


def test_higher_priority_overtakes(batching_server: InProcessServer) -> None:
    client = grpcclient.InferenceServerClient(batching_server.grpc_url)
    done: queue.Queue = queue.Queue()
    # The block holds the one instance for about half a second (the loop's trips), long
    # enough that the others always queue behind it, on any machine.
    block = grpcclient.InferInput("COUNT", [1, 1], "INT64")
    block.set_data_from_numpy(np.array([[600_000]], np.int64))
    small = grpcclient.InferInput("COUNT", [1, 1], "INT64")
    small.set_data_from_numpy(np.ones((1, 1), np.int64))

    def callback(tag: str):  # type: ignore[no-untyped-def]
        return lambda result, error: done.put((tag, error))

    client.async_infer("prioritized", [block], callback("block"))
    time.sleep(0.02)
    for i in range(3):
        client.async_infer("prioritized", [small], callback(f"low{i}"), priority=2)
    time.sleep(0.01)
    client.async_infer("prioritized", [small], callback("high"), priority=1)
    order = [done.get(timeout=60) for _ in range(5)]
    assert all(error is None for _, error in order)
    tags = [tag for tag, _ in order]
    assert tags.index("high") < max(tags.index(f"low{i}") for i in range(3))
    with pytest.raises(InferenceServerException, match="priority 7"):
        client.infer("prioritized", [small], priority=7)


def test_preserve_ordering_across_instances(batching_server: InProcessServer) -> None:
    client = grpcclient.InferenceServerClient(batching_server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        sizes = [32, 1, 32, 1, 1]
        for i, size in enumerate(sizes):
            item = grpcclient.InferInput("INPUT0", [size, 1024], "FP32")
            item.set_data_from_numpy(np.ones((size, 1024), np.float32))
            client.async_stream_infer("ordered", [item], request_id=str(i))
        ids = []
        for _ in sizes:
            result, error = responses.get(timeout=60)
            assert error is None
            ids.append(result.get_response().id)
        assert ids == [str(i) for i in range(len(sizes))]
    finally:
        client.stop_stream()


def test_failed_instance_is_replaced(batching_server: InProcessServer) -> None:
    client = httpclient.InferenceServerClient(batching_server.http_url)
    good = httpclient.InferInput("INDEX", [1, 1], "INT64")
    good.set_data_from_numpy(np.array([[2]], np.int64))
    bad = httpclient.InferInput("INDEX", [1, 1], "INT64")
    bad.set_data_from_numpy(np.array([[99]], np.int64))
    assert client.infer("fragile", [good]).as_numpy("OUTPUT0")[0, 0] == 30
    with pytest.raises(InferenceServerException) as info:
        client.infer("fragile", [bad])
    assert info.value.status() == "500"
    deadline = time.monotonic() + 30
    while "replaced and warm" not in batching_server.log():
        assert time.monotonic() < deadline, batching_server.log()
        time.sleep(0.05)
    for _ in range(5):
        assert client.infer("fragile", [good]).as_numpy("OUTPUT0")[0, 0] == 30
    assert client.is_model_ready("fragile")


def test_outputs_without_the_batch_rows_fail_clearly(batching_server: InProcessServer) -> None:
    """A model that returns fewer rows than its batch: the load fails where warm-up sees it,
    and otherwise each request of such a batch fails with the reason (not a hang), while
    smaller batches and other models go on being served."""
    client = httpclient.InferenceServerClient(batching_server.http_url)
    assert not client.is_model_ready("total_sum")
    assert (
        "model 'total_sum': warm-up 'default_batch_1': output 'OUTPUT0' has shape [] for a "
        "batch of 1 rows" in batching_server.log()
    )
    three = httpclient.InferInput("INPUT0", [3, 4], "FP32")
    three.set_data_from_numpy(np.ones((3, 4), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("first_two_rows", [three])
    assert info.value.status() == "500"
    assert "output 'OUTPUT0' has shape [2, 4] for a batch of 3 rows" in info.value.message()
    one = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    one.set_data_from_numpy(np.full((1, 4), 7, np.float32))
    np.testing.assert_array_equal(
        client.infer("first_two_rows", [one]).as_numpy("OUTPUT0"), np.full((1, 4), 7)
    )
    assert client.is_model_ready("first_two_rows")
    assert stats(batching_server, "first_two_rows")["inference_stats"]["fail"]["count"] == 1


def test_warmup_gates_readiness(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    save(
        matmul_chain(),
        root,
        "slow_warmup",
        chain_config(
            'model_warmup [{ name: "heavy" batch_size: 32 count: 40 '
            'inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [1024] random_data: true } } }]\n'
        ),
    )
    server = InProcessServer([root], log_path=tmp_path / "warm.log")
    try:
        server.wait_live(ready_log=False)
        client = httpclient.InferenceServerClient(server.http_url)
        assert not client.is_server_ready()
        assert not client.is_model_ready("slow_warmup")
        deadline = time.monotonic() + 120
        while not client.is_server_ready():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.is_model_ready("slow_warmup")
        log = server.log()
        assert log.index("warmed (1 sample)") < log.index("server ready")
    finally:
        server.stop()


def _scrape(server: InProcessServer) -> tuple[str, dict[str, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    return text, values


def test_metrics_move_with_batches(batching_server: InProcessServer) -> None:
    concurrent_grpc(batching_server, "batched", [np.ones((1, 4), np.float32)] * 8)
    idle = 'enginehouse_instances{model="batched",state="idle",version="1"}'
    # The instance goes back to idle just after the last answer, and a health check may
    # hold it for a moment: the scrape that counts it idle is the one checked.
    deadline = time.monotonic() + 10
    text, values = _scrape(batching_server)
    while values.get(idle) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        text, values = _scrape(batching_server)
    key = '{model="batched",version="1"}'
    assert values["nv_inference_exec_count" + key] < values["nv_inference_count" + key]
    assert (
        values['nv_inference_request_summary_us{model="batched",quantile="0.99",version="1"}'] > 0
    )
    assert values["nv_inference_queue_summary_us_count" + key] >= 8
    assert values['enginehouse_batch_size_bucket{le="+Inf",model="batched",version="1"}'] >= 1
    assert values["enginehouse_batch_size_sum" + key] == values["nv_inference_count" + key]
    assert 'enginehouse_instances{model="fragile",state="failed",version="1"}' in values
    assert values[idle] == 1
    assert (
        values['enginehouse_warmup_seconds{instance="batched_0_0_v1",model="batched",version="1"}']
        > 0
    )
    assert "enginehouse_queue_size" + key in values
    assert 0 <= values["nv_cpu_utilization"] <= 1
    assert values["nv_cpu_memory_total_bytes"] >= values["nv_cpu_memory_used_bytes"] > 0
    assert "# TYPE nv_inference_request_summary_us summary" in text


def test_idle_instances_pass_health_checks(batching_server: InProcessServer) -> None:
    def checks() -> float:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{batching_server.metrics_port}/metrics")
            .read()
            .decode()
        )
        for line in text.splitlines():
            if line.startswith('enginehouse_health_checks_total{model="batched",version="1"}'):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no health-check metric")

    first = checks()
    deadline = time.monotonic() + 10
    while checks() <= first:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    before = stats(batching_server, "batched")["execution_count"]
    time.sleep(0.5)
    assert stats(batching_server, "batched")["execution_count"] == before, (
        "health checks do not count as executions"
    )
