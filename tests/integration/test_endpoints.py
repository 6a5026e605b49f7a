"""Health, metadata, config, statistics, repository and metrics endpoints, HTTP and gRPC."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.integration.test_inference import simple_inputs


def test_health_and_server_metadata(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "enginehouse"
    assert "binary_tensor_data" in meta["extensions"]
    assert grpc.get_server_metadata().name == "enginehouse"


def test_model_ready_and_versions(server: ServerProcess) -> None:
    for module, address in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(address)
        assert client.is_model_ready("simple")
        assert client.is_model_ready("simple", "1")
        assert not client.is_model_ready("simple", "2")
        assert not client.is_model_ready("no_such_model")


def test_model_metadata(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    meta = http.get_model_metadata("simple", "1")
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    gmeta = grpc.get_model_metadata("simple_nobatch")
    assert list(gmeta.inputs[0].shape) == [16]
    assert gmeta.outputs[1].name == "OUTPUT1"


def test_model_config_both_protocols(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    config = http.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["input"][0]["dims"] == [16]
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    gconfig = grpc.get_model_config("simple").config
    assert gconfig.max_batch_size == 8
    assert list(gconfig.output[1].dims) == [16]


def test_statistics_count_batch_elements(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    before = http.get_inference_statistics("identity_int32")["model_stats"][0]
    data = np.ones((5, 3), dtype=np.int32)
    item = httpclient.InferInput("INPUT0", [5, 3], "INT32")
    item.set_data_from_numpy(data)
    http.infer("identity_int32", [item])
    http.infer("identity_int32", [item])
    after = http.get_inference_statistics("identity_int32")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 10
    assert after["execution_count"] - before["execution_count"] == 2
    stats = after["inference_stats"]
    assert stats["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert stats["compute_infer"]["ns"] > 0 and stats["queue"]["count"] >= 2
    assert after["last_inference"] > 0
    assert any(
        b["batch_size"] == 5 and b["compute_infer"]["count"] >= 2 for b in after["batch_stats"]
    )
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    gstats = grpc.get_inference_statistics("identity_int32", as_json=True)["model_stats"][0]
    # One statistics entry in both protocols' shapes: the gRPC message carries the same
    # figures (int64 fields come back as JSON strings).
    assert int(gstats["inference_count"]) == after["inference_count"]
    assert int(gstats["execution_count"]) == after["execution_count"]
    assert int(gstats["inference_stats"]["success"]["count"]) == stats["success"]["count"]
    assert int(gstats["last_inference"]) == after["last_inference"]
    assert {int(b["batch_size"]) for b in gstats["batch_stats"]} == {
        b["batch_size"] for b in after["batch_stats"]
    }
    everything = http.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in everything} >= {"simple", "identity_int32", "convnet"}


def test_failure_statistics(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    before = http.get_inference_statistics("simple")["model_stats"][0]["inference_stats"]["fail"][
        "count"
    ]
    bad = httpclient.InferInput("INPUT0", [1, 15], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 15), np.int32))
    with pytest.raises(InferenceServerException):
        http.infer("simple", [bad])
    after = http.get_inference_statistics("simple")["model_stats"][0]["inference_stats"]["fail"][
        "count"
    ]
    assert after == before + 1


def test_repository_index(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    index = http.get_model_repository_index()
    names = {entry["name"] for entry in index}
    assert {"simple", "convnet", "identity_bytes"} <= names
    assert all(entry["state"] == "READY" for entry in index)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    gindex = grpc.get_model_repository_index()
    assert {m.name for m in gindex.models} == names


def test_load_refused_in_none_mode(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="not allowed"):
        http.load_model("simple")
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="not allowed"):
        grpc.unload_model("simple")
    assert http.is_model_ready("simple")


def test_metrics_endpoint_counts_requests(server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    _, _, inputs = simple_inputs(httpclient, 3)
    http.infer("simple", inputs)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines['nv_inference_request_success{model="simple",version="1"}'] >= 1
    assert lines['nv_inference_count{model="simple",version="1"}'] >= 3
    assert 'nv_inference_queue_duration_us{model="simple",version="1"}' in lines
    assert "# TYPE nv_inference_request_success counter" in text


def test_request_path_warmup_succeeds(server: ServerProcess) -> None:
    assert "request-path warm-up failed" not in server.log()


UNSUPPORTED_CALLS = [
    ("get_trace_settings", (), "trace"),
    ("get_log_settings", (), "logging"),
]


def _unimplemented_rpcs(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for method, args, extension in UNSUPPORTED_CALLS:
        with pytest.raises(InferenceServerException) as info:
            getattr(client, method)(*args)
        assert info.value.status() == "StatusCode.UNIMPLEMENTED", method
        assert extension in info.value.message(), method
    assert "Traceback" not in server.log()
    assert "ERROR" not in server.log().upper().replace("ERRORS", "")


def test_unsupported_extensions_answer_unimplemented_naming_them(server: ServerProcess) -> None:
    _unimplemented_rpcs(server)
    http = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="trace extension"):
        http.get_trace_settings()


def test_unknown_routes_are_404_and_wrong_methods_405_with_allow(server: ServerProcess) -> None:
    import http.client

    def ask(method: str, path: str) -> tuple[int, str | None]:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        try:
            connection.request(method, path, body=b"{}" if method == "POST" else None)
            response = connection.getresponse()
            response.read()
            return response.status, response.getheader("Allow")
        finally:
            connection.close()

    for method in ("GET", "POST", "PUT", "DELETE"):
        assert ask(method, "/v2/nothing/here")[0] == 404
        assert ask(method, "/v2/models/simple/nonsense")[0] == 404
        assert ask(method, "/v3")[0] == 404
    assert ask("GET", "/v2/models/simple/infer") == (405, "POST")
    assert ask("POST", "/v2/models/simple") == (405, "GET")
    assert ask("POST", "/v2/health/ready") == (405, "GET")
    assert ask("GET", "/v2/repository/index") == (405, "POST")
    assert ask("DELETE", "/v2/models/simple/config") == (405, "GET")


# What promtool's lint says of the names Triton gives its metrics, which are kept as Triton
# has them so that its dashboards work: nothing else may be reported.
TRITON_NAMING = (
    'counter metrics should have "_total" suffix',
    "metric names should not contain abbreviated units",
    "metric name should not include type 'summary'",
    'non-histogram and non-summary metrics should not have "_count" suffix',
)


def test_metrics_pass_promtool(server: ServerProcess) -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/test.sh)")
    http = httpclient.InferenceServerClient(server.http_url)
    _, _, inputs = simple_inputs(httpclient, 2)
    http.infer("simple", inputs)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    problems = [
        line
        for line in (result.stdout + result.stderr).decode().splitlines()
        if line and not any(ok in line for ok in TRITON_NAMING)
    ]
    assert result.returncode in (0, 3), result  # 3: lint findings only
    assert problems == []
