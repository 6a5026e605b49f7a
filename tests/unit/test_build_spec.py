"""The build spec's ``engine_static_batch_sizes`` and ``engine_fuse_convolutions``: parsed,
checked, and keyed only when they differ from the default."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.config.build_spec import build_spec
from enginehouse.errors import ModelLoadError


def _config(static: str, max_batch_size: int = 64) -> mc.ModelConfig:
    text = f'name: "m" max_batch_size: {max_batch_size}\n'
    if static:
        text += f'parameters {{ key: "engine_static_batch_sizes" value: {{ string_value: "{static}" }} }}'
    return text_format.Parse(text, mc.ModelConfig())


def test_sizes_are_sorted_and_distinct() -> None:
    spec = build_spec(_config("64, 16,16"), "pytorch", "cuda:0")
    assert spec is not None and spec.static_batches == (16, 64)
    assert spec.key_parts()["static_batches"] == (16, 64)


def test_a_spec_without_sizes_keeps_the_key_it_had() -> None:
    # Engines cached before the parameter existed stay valid: the key has no such part.
    spec = build_spec(_config(""), "pytorch", "cuda:0")
    assert spec is not None and spec.static_batches == ()
    assert "static_batches" not in spec.key_parts()


@pytest.mark.parametrize(
    ("static", "max_batch_size"), [("0", 64), ("65", 64), ("8,x", 64), ("1", 0)]
)
def test_bad_sizes_are_a_clear_error(static: str, max_batch_size: int) -> None:
    with pytest.raises(ModelLoadError, match="engine_static_batch_sizes must be batch sizes"):
        build_spec(_config(static, max_batch_size), "pytorch", "cuda:0")


def test_convolutions_are_fused_unless_the_config_says_not() -> None:
    fused = build_spec(_config(""), "pytorch", "cuda:0")
    assert fused is not None and fused.fuse_convolutions
    assert "fuse_convolutions" not in fused.key_parts()
    text = 'name: "m" max_batch_size: 8\nparameters { key: "engine_fuse_convolutions" value: { string_value: "false" } }'
    plain = build_spec(text_format.Parse(text, mc.ModelConfig()), "pytorch", "cuda:0")
    assert plain is not None and not plain.fuse_convolutions
    assert plain.key_parts()["fuse_convolutions"] is False
