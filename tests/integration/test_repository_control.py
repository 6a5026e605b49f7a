"""Explicit model control, version policies, config completion and broken models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer
from tests.integration.test_errors import raw_post


def test_explicit_mode_loads_only_what_is_asked(explicit_server: InProcessServer) -> None:
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("identity_fp32")
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["simple"]["state"] == "READY"
    assert "state" not in index["identity_fp32"]
    status, ready = raw_post(explicit_server, "/v2/repository/index", b'{"ready": true}')
    assert status == 200
    assert [e["name"] for e in ready] == ["simple"]


def test_load_and_unload_http_and_grpc(explicit_server: InProcessServer) -> None:
    http = httpclient.InferenceServerClient(explicit_server.http_url)
    grpc = grpcclient.InferenceServerClient(explicit_server.grpc_url)
    http.load_model("identity_fp32")
    assert http.is_model_ready("identity_fp32")
    data = np.arange(4, dtype=np.float32).reshape(1, 4)
    item = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    item.set_data_from_numpy(data)
    np.testing.assert_array_equal(http.infer("identity_fp32", [item]).as_numpy("OUTPUT0"), data)
    grpc.unload_model("identity_fp32")
    assert not http.is_model_ready("identity_fp32")
    index = {e["name"]: e for e in http.get_model_repository_index()}
    assert index["identity_fp32"]["state"] == "UNAVAILABLE"
    assert index["identity_fp32"]["reason"] == "unloaded"
    with pytest.raises(InferenceServerException) as info:
        http.infer("identity_fp32", [item])
    assert info.value.status() == "404"
    grpc.load_model("identity_fp32")
    assert grpc.is_model_ready("identity_fp32")
    grpc.load_model("convnet")
    assert http.get_model_config("convnet")["max_batch_size"] == 4


def test_load_with_config_override(explicit_server: InProcessServer) -> None:
    http = httpclient.InferenceServerClient(explicit_server.http_url)
    override = {
        "name": "identity_fp32",
        "backend": "onnxruntime",
        "max_batch_size": 2,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
    }
    http.load_model("identity_fp32", config=json.dumps(override))
    assert http.get_model_config("identity_fp32")["max_batch_size"] == 2
    item = httpclient.InferInput("INPUT0", [3, 2], "FP32")
    item.set_data_from_numpy(np.zeros((3, 2), np.float32))
    with pytest.raises(InferenceServerException, match="batch-size must be <= 2"):
        http.infer("identity_fp32", [item])


def test_load_errors(explicit_server: InProcessServer, explicit_repo: Path) -> None:
    http = httpclient.InferenceServerClient(explicit_server.http_url)
    with pytest.raises(InferenceServerException) as info:
        http.load_model("not_there")
    assert info.value.status() == "404"
    for name in ("..", "../etc", "%2E%2E"):
        status, reply = raw_post(explicit_server, f"/v2/repository/models/{name}/load", b"")
        assert status in (400, 404), reply
    broken = explicit_repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not onnx")
    with pytest.raises(InferenceServerException, match="broken"):
        http.load_model("broken")
    index = {e["name"]: e for e in http.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert index["broken"]["reason"]
    assert http.is_model_ready("simple")
    with pytest.raises(InferenceServerException, match="invalid config override"):
        http.load_model("simple", config="{not json")


def test_version_policies(explicit_server: InProcessServer, explicit_repo: Path) -> None:
    http = httpclient.InferenceServerClient(explicit_server.http_url)
    model = explicit_repo / "versions"
    for version in (1, 2, 3):
        shutil.copytree(explicit_repo / "identity_fp32" / "1", model / str(version))
    config = (explicit_repo / "identity_fp32" / "config.pbtxt").read_text()
    config = config.replace('name: "identity_fp32"', 'name: "versions"')
    (model / "config.pbtxt").write_text(config)
    http.load_model("versions")
    assert http.get_model_metadata("versions")["versions"] == ["3"]
    assert not http.is_model_ready("versions", "2")

    (model / "config.pbtxt").write_text(config + "version_policy: { all: {} }\n")
    http.load_model("versions")
    assert http.get_model_metadata("versions")["versions"] == ["1", "2", "3"]
    item = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    item.set_data_from_numpy(np.ones((1, 1), np.float32))
    assert http.infer("versions", [item]).get_response()["model_version"] == "3"
    assert http.infer("versions", [item], model_version="1").get_response()["model_version"] == "1"
    stats = http.get_inference_statistics("versions")["model_stats"]
    assert sorted(s["version"] for s in stats) == ["1", "2", "3"]

    (model / "config.pbtxt").write_text(
        config + "version_policy: { specific: { versions: [1, 3] } }\n"
    )
    http.load_model("versions")
    assert http.get_model_metadata("versions")["versions"] == ["1", "3"]

    (model / "config.pbtxt").write_text(
        config + "version_policy: { latest: { num_versions: 2 } }\n"
    )
    http.load_model("versions")
    assert http.get_model_metadata("versions")["versions"] == ["2", "3"]


def test_config_mismatch_with_graph_fails_clearly(
    explicit_server: InProcessServer, explicit_repo: Path
) -> None:
    http = httpclient.InferenceServerClient(explicit_server.http_url)
    config = explicit_repo / "identity_fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace("TYPE_FP32", "TYPE_INT32"))
    with pytest.raises(InferenceServerException, match="INT32 in the config but FP32"):
        http.load_model("identity_fp32")


def test_strict_model_config_requires_config(explicit_repo: Path, tmp_path: Path) -> None:
    server = InProcessServer(
        [explicit_repo],
        "--strict-model-config",
        "true",
        "--strict-readiness",
        "false",
        log_path=tmp_path / "strict.log",
    )
    try:
        server.wait_live()
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("simple")
        assert not client.is_model_ready("convnet")
        assert "strict-model-config" in server.log()
    finally:
        assert server.stop() == 0


def test_unsupported_fields_are_logged_once(explicit_repo: Path, tmp_path: Path) -> None:
    config = explicit_repo / "simple" / "config.pbtxt"
    config.write_text(config.read_text() + "response_cache { enable: true }\n")
    server = InProcessServer([explicit_repo], log_path=tmp_path / "fields.log")
    try:
        server.wait_live()
        assert httpclient.InferenceServerClient(server.http_url).is_model_ready("simple")
        assert server.log().count("'response_cache' is not supported yet") == 1
    finally:
        server.stop()


def test_readiness_false_while_a_startup_model_failed(explicit_repo: Path, tmp_path: Path) -> None:
    broken = explicit_repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"junk")
    server = InProcessServer([explicit_repo], log_path=tmp_path / "ready.log")
    try:
        server.wait_live()
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert client.is_model_ready("simple")
    finally:
        server.stop()
