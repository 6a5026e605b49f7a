"""Canary weights, folder fingerprints and override paths, without a server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.core import overrides
from enginehouse.core.routing import parse_version_weights
from enginehouse.errors import InvalidArgumentError, ModelLoadError
from enginehouse.repository.fingerprint import model_fingerprint, version_identity


def config_with(weights: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name="m")
    config.parameters["version_weights"].string_value = weights
    return config


def test_version_weights_parse() -> None:
    assert parse_version_weights(mc.ModelConfig(name="m")) == {}
    assert parse_version_weights(config_with("2:10, 1:90")) == {2: 10.0, 1: 90.0}
    assert parse_version_weights(config_with("3:0,1:1")) == {3: 0.0, 1: 1.0}
    for bad in ("2", "x:1", "2:-1", "0:5", "2:nan", "2:inf", "1:0,2:0"):
        with pytest.raises(ModelLoadError, match="version_weights"):
            parse_version_weights(config_with(bad))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_fingerprints_follow_files(tmp_path: Path) -> None:
    model = tmp_path / "m"
    write(model / "config.pbtxt", "max_batch_size: 4")
    write(model / "1" / "model.onnx", "one")
    write(model / "2" / "model.onnx", "two")
    config = mc.ModelConfig(name="m", max_batch_size=4)
    first = model_fingerprint(model)
    v1 = version_identity(model, 1, config)

    # Routing fields and other versions' files do not change a version's identity.
    routed = mc.ModelConfig()
    routed.CopyFrom(config)
    routed.version_policy.specific.versions.append(2)
    routed.parameters["version_weights"].string_value = "2:1"
    write(model / "2" / "model.onnx", "two, rewritten")
    assert version_identity(model, 1, routed) == v1
    assert model_fingerprint(model) != first

    # Its own files, model-level data and the rest of the config do.
    write(model / "1" / "model.onnx", "one, longer")
    assert version_identity(model, 1, config) != v1
    v1 = version_identity(model, 1, config)
    write(model / "warmup" / "input.npy", "data")
    assert version_identity(model, 1, config) != v1
    v1 = version_identity(model, 1, config)
    config.max_batch_size = 8
    assert version_identity(model, 1, config) != v1

    # A rewrite with the same size is seen through the modification time.
    before = model_fingerprint(model)
    stat = os.stat(model / "1" / "model.onnx")
    os.utime(model / "1" / "model.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert model_fingerprint(model) != before


def test_override_files_stay_in_their_staging_folder() -> None:
    location = overrides.stage("m", {"1/model.onnx": b"x", "1/sub/extra.bin": b"y"})
    try:
        assert (location.path / "1" / "model.onnx").read_bytes() == b"x"
        assert (location.path / "1" / "sub" / "extra.bin").read_bytes() == b"y"
        assert location.path.parent == location.root
    finally:
        overrides.discard(location.path)
    assert not location.root.exists()
    for key in ("../x", "/etc/passwd", "1/../../x", "model.onnx", "01/model.onnx", "1\\x", ""):
        with pytest.raises(InvalidArgumentError):
            overrides.stage("m", {key: b"x"})
