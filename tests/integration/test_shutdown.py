"""SIGTERM: readiness goes, new requests get 503, admitted requests finish, exit 0."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.integration.test_errors import raw_post
from tests.models import loop_model, save

BATCHING = "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
# Each request holds an instance for about half a second (the loop's trips), so that they are
# surely still running when the signal comes, on any machine.
SLOW = """backend: "onnxruntime"
max_batch_size: 8
input [{ name: "COUNT" data_type: TYPE_INT64 dims: [1] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [1] }]
instance_group [{ count: 2 kind: KIND_CPU }]
parameters { key: "inline_execution" value: { string_value: "never" } }
"""
TRIPS = 600_000


def _metric(text: str, name: str, model: str) -> float:
    prefix = f'{name}{{model="{model}",version="1"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def _wait_until_admitted(server: ServerProcess, model: str, count: int) -> None:
    """Until the server's metrics count ``count`` requests of ``model`` admitted (pending or
    answered) with some still pending: a fixed sleep lost the last of them to a busy
    machine, and waiting for all of them pending at once lost the race to the first answers
    there."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
            text = reply.read().decode()
        pending = _metric(text, "nv_inference_pending_request_count", model)
        answered = _metric(text, "nv_inference_request_success", model)
        if pending and pending + answered >= count:
            return
        assert time.monotonic() < deadline, f"never {count} admitted ({text})"
        time.sleep(0.01)


@pytest.mark.parametrize("batching", [False, True], ids=["default", "dynamic"])
def test_sigterm_finishes_admitted_requests(tmp_path: Path, batching: bool) -> None:
    repo = tmp_path / "repo"
    save(loop_model(batch=True), repo, "slow", SLOW + (BATCHING if batching else ""))
    server = ServerProcess([repo], log_path=tmp_path / "shutdown.log")
    server.wait_live()
    client = httpclient.InferenceServerClient(server.http_url, concurrency=6, network_timeout=120)
    item = httpclient.InferInput("COUNT", [1, 1], "INT64")
    item.set_data_from_numpy(np.array([[TRIPS]], np.int64))
    pending = [client.async_infer("slow", [item]) for _ in range(6)]
    _wait_until_admitted(server, "slow", 6)  # every one admitted, some not answered yet
    server.process.send_signal(15)
    probe = httpclient.InferenceServerClient(server.http_url)
    deadline = time.monotonic() + 10
    while probe.is_server_ready():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    body = json.dumps(
        {"inputs": [{"name": "COUNT", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}
    ).encode()
    late_status, late_reply = raw_post(server, "/v2/models/slow/infer", body)
    results: list[object] = []
    for request in pending:
        try:
            results.append(float(request.get_result().as_numpy("OUTPUT0")[0, 0]))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)
    assert server.process.wait(120) == 0
    server.stop()
    assert results == [float(TRIPS)] * 6, results
    assert late_status == 503 and "shutting down" in late_reply["error"]
    assert "draining" in server.log()
