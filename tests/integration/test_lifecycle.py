"""Model lifecycle: polling, file overrides, failed reloads, canary splits, freed memory,
and control requests racing each other."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer, ServerProcess
from tests.integration.test_errors import raw_post
from tests.rollout import WIDTH, scale_model

SCALE_CONFIG = (
    'backend: "onnxruntime"\nmax_batch_size: 8\n'
    f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{WIDTH}] }}]\n'
    f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{WIDTH}] }}]\n'
)


def write_version(root: Path, name: str, version: int, factor: int | None = None) -> None:
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "model.onnx.tmp"
    onnx.save(scale_model(factor or version), str(staged))
    staged.replace(folder / "model.onnx")


def write_config(root: Path, name: str, text: str) -> None:
    staged = root / name / "config.pbtxt.tmp"
    staged.write_text(text)
    staged.replace(root / name / "config.pbtxt")


def infer(
    client: httpclient.InferenceServerClient, name: str, version: str = ""
) -> tuple[int, float]:
    """(version that answered, factor it applied)."""
    data = np.ones((1, WIDTH), np.float32)
    item = httpclient.InferInput("INPUT0", [1, WIDTH], "FP32")
    item.set_data_from_numpy(data)
    result = client.infer(name, [item], model_version=version)
    return int(result.get_response()["model_version"]), float(result.as_numpy("OUTPUT0")[0, 0])


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def index_of(client: httpclient.InferenceServerClient, name: str) -> dict[str, tuple[str, str]]:
    return {
        e.get("version", ""): (e.get("state", ""), e.get("reason", ""))
        for e in client.get_model_repository_index()
        if e["name"] == name
    }


def metrics(server: InProcessServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


@pytest.fixture()
def poll_server(tmp_path: Path) -> Iterator[tuple[InProcessServer, Path]]:
    root = tmp_path / "repo"
    write_version(root, "scaled", 1)
    write_config(root, "scaled", SCALE_CONFIG)
    proc = InProcessServer(
        [root],
        "--model-control-mode",
        "poll",
        "--repository-poll-secs",
        "0.2",
        log_path=tmp_path / "poll.log",
    )
    try:
        proc.wait_ready()
        yield proc, root
    finally:
        proc.stop()


def test_poll_mode_applies_repository_changes(poll_server: tuple[InProcessServer, Path]) -> None:
    server, root = poll_server
    client = httpclient.InferenceServerClient(server.http_url)
    assert infer(client, "scaled") == (1, 1.0)

    write_version(root, "scaled", 2)  # a new version replaces v1 (policy: latest 1)
    wait_for(lambda: index_of(client, "scaled") == {"2": ("READY", "")})
    assert infer(client, "scaled") == (2, 2.0)

    write_version(root, "scaled", 2, factor=5)  # changed model file of the serving version
    wait_for(lambda: infer(client, "scaled") == (2, 5.0))

    write_config(root, "scaled", SCALE_CONFIG.replace("max_batch_size: 8", "max_batch_size: 3"))
    wait_for(lambda: client.get_model_config("scaled")["max_batch_size"] == 3)

    write_version(root, "added", 1)  # a new model
    write_config(root, "added", SCALE_CONFIG)
    wait_for(lambda: client.is_model_ready("added"))
    assert infer(client, "added") == (1, 1.0)

    shutil.rmtree(root / "added")  # a removed model
    wait_for(lambda: not client.is_model_ready("added"))
    with pytest.raises(InferenceServerException) as info:
        infer(client, "added")
    assert info.value.status() == "404"

    with pytest.raises(InferenceServerException, match="poll"):
        client.load_model("scaled")
    with pytest.raises(InferenceServerException, match="poll"):
        client.unload_model("scaled")
    assert not server.exited()


def test_broken_new_version_leaves_the_old_one_serving(
    poll_server: tuple[InProcessServer, Path],
) -> None:
    server, root = poll_server
    client = httpclient.InferenceServerClient(server.http_url)
    (root / "scaled" / "7").mkdir()
    (root / "scaled" / "7" / "model.onnx").write_bytes(b"not an onnx model")
    wait_for(lambda: index_of(client, "scaled").get("7", ("", ""))[0] == "UNAVAILABLE")
    states = index_of(client, "scaled")
    assert states["1"] == ("READY", "")
    assert "7" in states and states["7"][1], states
    for _ in range(5):
        assert infer(client, "scaled") == (1, 1.0)
    assert 'enginehouse_model_loads_total{model="scaled",outcome="failure"} 1.0' in metrics(server)
    time.sleep(0.6)  # an unchanged broken folder is not retried on every poll
    assert 'outcome="failure"} 1' in metrics(server)

    write_version(root, "scaled", 7)  # fixed: the next poll serves it
    wait_for(lambda: index_of(client, "scaled") == {"7": ("READY", "")})
    assert infer(client, "scaled") == (7, 7.0)


def test_failed_reload_by_api_keeps_serving(
    explicit_server: InProcessServer, explicit_repo: Path
) -> None:
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    (explicit_repo / "simple" / "2").mkdir()
    (explicit_repo / "simple" / "2" / "model.onnx").write_bytes(b"\x08garbage")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple")
    assert info.value.status() == "400"
    assert "keep serving" in str(info.value)
    states = index_of(client, "simple")
    assert states["1"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE"
    assert client.is_model_ready("simple", "1")


def test_load_with_file_override(explicit_server: InProcessServer) -> None:
    http = httpclient.InferenceServerClient(explicit_server.http_url)
    grpc = grpcclient.InferenceServerClient(explicit_server.grpc_url)
    config = {
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}],
    }
    files = {"file:3/model.onnx": scale_model(3).SerializeToString()}
    http.load_model("uploaded", config=json.dumps(config), files=files)
    assert infer(http, "uploaded") == (3, 3.0)
    files = {"file:4/model.onnx": scale_model(4).SerializeToString()}
    grpc.load_model("uploaded", config=json.dumps(config), files=files)
    assert infer(http, "uploaded") == (4, 4.0)
    http.unload_model("uploaded")
    assert not http.is_model_ready("uploaded")

    model = base64.b64encode(scale_model(1).SerializeToString()).decode()
    for key in ("file:../model.onnx", "file:/etc/passwd", "file:1/../../x", "file:model.onnx"):
        body = {"parameters": {"config": json.dumps(config), key: model}}
        status, reply = raw_post(
            explicit_server, "/v2/repository/models/evil/load", json.dumps(body).encode()
        )
        assert status == 400, reply
    body = {"parameters": {"file:1/model.onnx": model}}
    status, reply = raw_post(
        explicit_server, "/v2/repository/models/evil/load", json.dumps(body).encode()
    )
    assert status == 400 and "config" in reply["error"]
    body = {"parameters": {"config": json.dumps(config), "file:1/model.onnx": "%%%"}}
    status, reply = raw_post(
        explicit_server, "/v2/repository/models/evil/load", json.dumps(body).encode()
    )
    assert status == 400 and "base64" in reply["error"]


def canary_config(weights: str) -> str:
    return (
        SCALE_CONFIG
        + "version_policy: { all: {} }\n"
        + f'parameters {{ key: "version_weights" value: {{ string_value: "{weights}" }} }}\n'
    )


def test_canary_split_and_weight_change(
    explicit_server: InProcessServer, explicit_repo: Path
) -> None:
    write_version(explicit_repo, "canary", 1)
    write_version(explicit_repo, "canary", 2)
    write_config(explicit_repo, "canary", canary_config("2:20,1:80"))
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    client.load_model("canary")
    requests = 1000

    def shares() -> Counter[int]:
        counts: Counter[int] = Counter()
        for _ in range(requests):
            version, factor = infer(client, "canary")
            assert factor == version
            counts[version] += 1
        return counts

    counts = shares()
    # Binomial(1000, 0.2): standard deviation 12.6; 5 of them either side.
    assert abs(counts[2] - 200) < 63, counts
    assert infer(client, "canary", "2") == (2, 2.0)  # addressed versions bypass the split

    # A reload that only changes the weights keeps both versions loaded (statistics go on).
    write_config(explicit_repo, "canary", canary_config("2:90,1:10"))
    client.load_model("canary")
    counts_after = shares()
    assert abs(counts_after[2] - 900) < 48, counts_after
    stats = client.get_inference_statistics("canary", "1")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == counts[1] + counts_after[1]
    text = metrics(explicit_server)
    assert (
        f'nv_inference_request_success{{model="canary",version="2"}} '
        f"{float(counts[2] + counts_after[2] + 1)}" in text
    )

    write_config(explicit_repo, "canary", canary_config("2:x"))
    with pytest.raises(InferenceServerException, match="version_weights"):
        client.load_model("canary")
    assert infer(client, "canary")[0] in (1, 2)  # the split in force keeps serving


def ballast_model(megabytes: int) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 @ W with W of ``megabytes`` MB (a repeating ramp: cheap to make,
    as costly to hold as random weights)."""
    columns = megabytes * 1024 * 1024 // (4 * 256)
    ramp = np.linspace(-1.0, 1.0, columns, dtype=np.float32)
    weight = numpy_helper.from_array(np.tile(ramp, (256, 1)), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["INPUT0", "W"], ["OUTPUT0"])],
        "ballast",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", columns])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture()
def explicit_process(explicit_repo: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """The explicit-mode server in a process of its own, whose memory the test reads."""
    with ServerProcess.live(
        [explicit_repo], "--model-control-mode", "explicit", "--load-model", "simple"
    ) as proc:
        yield proc


def test_unload_returns_memory(explicit_process: ServerProcess, explicit_repo: Path) -> None:
    megabytes = 128
    (explicit_repo / "ballast" / "1").mkdir(parents=True)
    onnx.save(ballast_model(megabytes), str(explicit_repo / "ballast" / "1" / "model.onnx"))
    client = httpclient.InferenceServerClient(explicit_process.http_url)
    process = psutil.Process(explicit_process.process.pid)

    def cycle() -> int:
        client.load_model("ballast")
        item = httpclient.InferInput("INPUT0", [2, 256], "FP32")
        item.set_data_from_numpy(np.ones((2, 256), np.float32))
        client.infer("ballast", [item])
        loaded = int(process.memory_info().rss)
        client.unload_model("ballast")
        return loaded

    cycle()  # first use of the code paths, allocator pools and imports
    before = int(process.memory_info().rss)
    loaded = cycle()
    after = int(process.memory_info().rss)
    mib = 1024 * 1024
    print(f"RSS before {before / mib:.0f} MiB, loaded {loaded / mib:.0f}, after {after / mib:.0f}")
    assert loaded - before > megabytes * mib * 0.8
    assert after - before < 16 * mib


def test_racing_control_requests_and_traffic(
    explicit_server: InProcessServer, explicit_repo: Path
) -> None:
    """Loads, reloads and unloads of one model from many threads while others infer:
    no deadlock, no crash, every request either answered right or refused cleanly."""
    write_version(explicit_repo, "raced", 1)
    write_config(explicit_repo, "raced", SCALE_CONFIG)
    errors: list[str] = []
    stop = threading.Event()

    def control(seed: int) -> None:
        client = httpclient.InferenceServerClient(explicit_server.http_url, network_timeout=120)
        rng = np.random.default_rng(seed)
        for _ in range(15):
            try:
                if rng.random() < 0.6:
                    client.load_model("raced")
                else:
                    client.unload_model("raced")
            except InferenceServerException as exc:
                errors.append(f"control: {exc}")

    def traffic() -> None:
        client = httpclient.InferenceServerClient(explicit_server.http_url)
        while not stop.is_set():
            try:
                version, factor = infer(client, "raced")
                if factor != version:
                    errors.append(f"version {version} answered with factor {factor}")
            except InferenceServerException as exc:
                if exc.status() not in ("404", "503"):  # not loaded at that moment
                    errors.append(f"infer: {exc.status()} {exc}")

    controllers = [threading.Thread(target=control, args=(i,)) for i in range(6)]
    clients = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in controllers + clients:
        thread.start()
    for thread in controllers:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a control request hung"
    stop.set()
    for thread in clients:
        thread.join(timeout=30)
    assert errors == []
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    client.load_model("raced")
    assert infer(client, "raced") == (1, 1.0)
