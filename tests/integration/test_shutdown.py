"""SIGTERM: readiness goes, requests in flight finish, the process exits 0."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.models import chain_config, matmul_chain, save


def write_slow_model(root: Path) -> None:
    save(matmul_chain(), root, "slow", chain_config(count=2))


def test_sigterm_finishes_requests_in_flight(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_slow_model(repo)
    server = ServerProcess([repo], log_path=tmp_path / "shutdown.log")
    server.wait_live()
    client = httpclient.InferenceServerClient(server.http_url, concurrency=4, network_timeout=120)
    data = np.ones((32, 1024), np.float32)
    item = httpclient.InferInput("INPUT0", [32, 1024], "FP32")
    item.set_data_from_numpy(data)
    single = time.perf_counter()
    client.infer("slow", [item])
    single = time.perf_counter() - single

    pending = [client.async_infer("slow", [item]) for _ in range(4)]
    time.sleep(min(0.05, single / 4))
    server.process.send_signal(15)
    results: list[object] = []
    for request in pending:
        try:
            results.append(request.get_result().as_numpy("OUTPUT0").shape)
        except Exception as exc:  # recorded and asserted below
            results.append(exc)
    assert server.process.wait(120) == 0
    server.stop()
    assert results == [(32, 1024)] * 4, results
    assert "draining" in server.log()
