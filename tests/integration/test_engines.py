"""Engine builds: each precision built and served, the cache, and the accuracy gate."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from enginehouse.builder import artifacts
from enginehouse.builder.cache import EngineCache
from enginehouse.config.model_config import parse_config_text
from enginehouse.errors import ModelLoadError
from tests.conftest import InProcessServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from make_repository import export_convnet

NET_CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: 8
input [{{ name: "image" data_type: TYPE_FP32 dims: [3, 32, 32] }}]
output [{{ name: "logits" data_type: TYPE_FP32 dims: [10] }}]
{parameters}
"""


def parameters(**values: str) -> str:
    def quoted(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"')

    return "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{quoted(v)}" }} }}'
        for k, v in values.items()
    )


def write_net(root: Path, name: str, **values: str) -> Path:
    model_dir = root / name
    export_convnet(model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(
        NET_CONFIG.format(name=name, parameters=parameters(**values))
    )
    return model_dir


def write_calibration(
    model_dir: Path,
    count: int = 8,
    shape: tuple[int, ...] = (1, 3, 32, 32),
    dtype: type = np.float32,
) -> None:
    folder = model_dir / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        np.savez(folder / f"sample{i}.npz", image=rng.standard_normal(shape).astype(dtype))


def prepare(model_dir: Path, cache: EngineCache) -> artifacts.BuiltEngine:
    config = parse_config_text((model_dir / "config.pbtxt").read_text(), "config")
    return artifacts.prepare(
        config, "onnxruntime", 1, model_dir / "1" / "model.onnx", model_dir, cache
    )


@pytest.fixture(scope="module")
def engine_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engines") / "repo"
    write_net(root, "net_fp32")
    write_net(root, "net_fp16", engine_precision="fp16")
    int8 = write_net(root, "net_int8", engine_precision="int8", engine_calibration="calibration")
    write_calibration(int8)
    write_net(root, "net_source", engine_build="false")
    return root


def build_args(repo: Path, cache: Path) -> list[str]:
    """The ``enginehouse build`` command line for a repository and a cache."""
    return [
        sys.executable,
        "-m",
        "enginehouse.cli",
        "build",
        "--model-repository",
        str(repo),
        "--engine-cache",
        str(cache),
    ]


def build_command(repo: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """``enginehouse build`` of a repository into a cache, as a user runs it."""
    return subprocess.run(build_args(repo, cache), capture_output=True, text=True, timeout=600)


def test_build_then_serve_every_precision(engine_repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = build_command(engine_repo, cache)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    for precision in ("fp32", "fp16", "int8"):
        assert f" {precision} " in table
    assert "built" in table and "not built" in table
    again = build_command(engine_repo, cache)
    assert again.stdout.count(" hit ") == 3

    server = InProcessServer(
        [engine_repo], "--engine-cache", str(cache), log_path=tmp_path / "serve.log"
    )
    try:
        server.wait_live()
        log = server.log()
        assert "building" not in log
        assert log.count("engine cache hit") == 3
        client = httpclient.InferenceServerClient(server.http_url)
        image = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
        source = ort.InferenceSession(str(engine_repo / "net_fp32" / "1" / "model.onnx"))
        reference = source.run(None, {"image": image})[0]
        for name, tolerance in (
            ("net_fp32", 1e-4),
            ("net_fp16", 1e-2),
            ("net_int8", 0.1),
            ("net_source", 1e-6),
        ):
            item = httpclient.InferInput("image", list(image.shape), "FP32")
            item.set_data_from_numpy(image)
            logits = client.infer(name, [item]).as_numpy("logits")
            scale = np.abs(reference).max()
            assert np.abs(logits - reference).max() / scale <= tolerance, name
    finally:
        server.stop()


def test_key_follows_model_bytes_and_spec(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache")
    model_dir = write_net(tmp_path / "repo", "net")
    first = prepare(model_dir, cache)
    assert not first.hit and first.entry is not None
    assert prepare(model_dir, cache).hit
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text() + "optimization { graph { level: 1 } }\n")
    changed_spec = prepare(model_dir, cache)
    assert not changed_spec.hit and changed_spec.entry.key != first.entry.key  # type: ignore[union-attr]
    model_path = model_dir / "1" / "model.onnx"
    model = onnx.load(str(model_path))
    model.doc_string = "retrained"  # other bytes, same graph
    onnx.save(model, str(model_path))
    changed_model = prepare(model_dir, cache)
    assert changed_model.entry.key not in (first.entry.key, changed_spec.entry.key)  # type: ignore[union-attr]
    manifest = changed_model.manifest
    assert manifest["source_sha256"] and manifest["build_seconds"] >= 0
    assert manifest["target"]["onnxruntime"] == ort.__version__
    assert set(manifest["accuracy"]) == {"logits"}


def test_truncated_artefact_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path / "cache")
    model_dir = write_net(tmp_path / "repo", "net")
    built = prepare(model_dir, cache)
    data = built.path.read_bytes()
    built.path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare(model_dir, cache)
    assert not rebuilt.hit
    assert "damaged" in caplog.text
    assert rebuilt.path.read_bytes() == data
    assert prepare(model_dir, cache).hit


def test_rewritten_artefact_of_the_same_size_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checksums are remembered per size and modification time, so a warm start does not
    hash every artefact; a file rewritten in place (same size) is still caught."""
    cache = EngineCache(tmp_path / "cache")
    model_dir = write_net(tmp_path / "repo", "net")
    built = prepare(model_dir, cache)
    assert prepare(model_dir, cache).hit
    data = built.path.read_bytes()
    built.path.write_bytes(bytes(len(data)))
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare(model_dir, cache)
    assert not rebuilt.hit and "checksum" in caplog.text
    assert rebuilt.path.read_bytes() == data


def test_concurrent_builds_of_one_key(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_net(repo, "net", engine_precision="fp16")
    cache = tmp_path / "cache"
    command = build_args(repo, cache)
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]
    assert sum(out.decode().count(" built ") for out, _ in outputs) == 1


def test_dynamic_int8_needs_no_calibration(tmp_path: Path) -> None:
    model_dir = write_net(
        tmp_path / "repo", "net", engine_precision="int8", engine_int8_mode="dynamic"
    )
    built = prepare(model_dir, EngineCache(tmp_path / "cache"))
    assert built.manifest["precision"] == "int8"
    assert built.manifest["spec"]["int8_mode"] == "dynamic"
    assert built.manifest["max_relative_error"] <= 0.1
    with pytest.raises(ModelLoadError, match="static or dynamic"):
        bad = write_net(
            tmp_path / "repo2", "net", engine_precision="int8", engine_int8_mode="sometimes"
        )
        prepare(bad, EngineCache(tmp_path / "cache"))


def test_accuracy_gate(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache")
    model_dir = write_net(
        tmp_path / "repo",
        "net",
        engine_precision="int8",
        engine_calibration="calibration",
        engine_tolerance="1e-7",
    )
    write_calibration(model_dir)
    with pytest.raises(ModelLoadError, match="fails the accuracy gate"):
        prepare(model_dir, cache)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text() + parameters(engine_force="true"))
    forced = prepare(model_dir, cache)
    assert forced.hit, "the artefact was cached; only the verdict changed"
    assert forced.manifest["max_relative_error"] > 1e-7


@pytest.mark.parametrize(
    ("values", "calibration", "message"),
    [
        ({"engine_precision": "int8"}, None, "int8 needs calibration data"),
        (
            {"engine_precision": "int8", "engine_calibration": "calibration"},
            ((1, 3, 16, 16), np.float32),
            "has shape",
        ),
        (
            {"engine_precision": "int8", "engine_calibration": "calibration"},
            ((1, 3, 32, 32), np.float64),
            "float64",
        ),
        ({"engine_precision": "int8", "engine_calibration": "nowhere"}, None, "does not exist"),
        ({"engine_precision": "int4"}, None, "not one of"),
        (
            {"engine_profiles": '{"image": {"2": {"min": 64, "opt": 32, "max": 16}}}'},
            None,
            "min <= opt <= max",
        ),
        (
            {"engine_profiles": '{"pixels": {"1": {"min": 1, "opt": 1, "max": 1}}}'},
            None,
            "unknown input",
        ),
    ],
)
def test_bad_build_inputs_name_the_model(
    tmp_path: Path, values: dict[str, str], calibration: tuple | None, message: str
) -> None:
    model_dir = write_net(tmp_path / "repo", "net", **values)
    if calibration is not None:
        write_calibration(model_dir, 2, calibration[0], calibration[1])
    with pytest.raises(ModelLoadError, match=message) as info:
        prepare(model_dir, EngineCache(tmp_path / "cache"))
    assert "'net'" in info.value.message


def test_a_failed_build_leaves_other_models_serving(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_net(repo, "good")
    write_net(repo, "bad", engine_precision="int8")
    server = InProcessServer(
        [repo],
        "--engine-cache",
        str(tmp_path / "cache"),
        "--strict-readiness",
        "false",
        log_path=tmp_path / "serve.log",
    )
    try:
        server.wait_live()
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("good")
        assert not client.is_model_ready("bad")
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert "int8 needs calibration data" in index["bad"]["reason"]
        assert "building onnxruntime fp32 engine at load" in server.log()
    finally:
        server.stop()


def test_unbuilt_source_served_only_when_asked(tmp_path: Path) -> None:
    model_dir = write_net(tmp_path / "repo", "net", engine_build="false")
    engine = prepare(model_dir, EngineCache(tmp_path / "cache"))
    assert engine.path == model_dir / "1" / "model.onnx" and engine.entry is None
