"""SIGTERM: readiness goes, new requests get 503, admitted requests finish, exit 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.integration.test_errors import raw_post
from tests.models import chain_config, matmul_chain, save

BATCHING = "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"


@pytest.mark.parametrize("batching", [False, True], ids=["default", "dynamic"])
def test_sigterm_finishes_admitted_requests(tmp_path: Path, batching: bool) -> None:
    repo = tmp_path / "repo"
    save(matmul_chain(), repo, "slow", chain_config(BATCHING if batching else "", count=2))
    server = ServerProcess([repo], log_path=tmp_path / "shutdown.log")
    server.wait_live()
    client = httpclient.InferenceServerClient(server.http_url, concurrency=6, network_timeout=120)
    data = np.ones((48, 1024), np.float32)
    item = httpclient.InferInput("INPUT0", [48, 1024], "FP32")
    item.set_data_from_numpy(data)
    pending = [client.async_infer("slow", [item]) for _ in range(6)]
    time.sleep(0.05)
    server.process.send_signal(15)
    probe = httpclient.InferenceServerClient(server.http_url)
    deadline = time.monotonic() + 10
    while probe.is_server_ready():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 1024], "data": [0.0] * 1024}
            ]
        }
    ).encode()
    late_status, late_reply = raw_post(server, "/v2/models/slow/infer", body)
    results: list[object] = []
    for request in pending:
        try:
            results.append(request.get_result().as_numpy("OUTPUT0").shape)
        except Exception as exc:  # recorded and asserted below
            results.append(exc)
    assert server.process.wait(120) == 0
    server.stop()
    assert results == [(48, 1024)] * 6, results
    assert late_status == 503 and "shutting down" in late_reply["error"]
    assert "draining" in server.log()
