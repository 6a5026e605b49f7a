"""SIGTERM: readiness goes, requests in flight finish, the process exits 0."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ServerProcess


def write_slow_model(root: Path, layers: int = 40, width: int = 1024) -> None:
    """A chain of MatMul+Tanh that takes tens of milliseconds per request on a CPU."""
    weight = numpy_helper.from_array(
        (np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)).astype(
            np.float32
        ),
        "W",
    )
    nodes = []
    current = "INPUT0"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [current, "W"], [f"m{i}"]))
        current = f"t{i}" if i < layers - 1 else "OUTPUT0"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [current]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "slow" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "slow" / "1" / "model.onnx"))
    (root / "slow" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 64\n'
        'input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [1024] }]\n'
        'output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [1024] }]\n'
        "instance_group [{ count: 2 kind: KIND_CPU }]\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    )


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
