"""Property-based fuzzing of both request decoders and the config override path, bounded to
about a minute (bench/fuzz.py runs the same properties far longer): every generated input is
decoded or refused with a 4xx-class error of the project's own, never anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from make_repository import SIMPLE_CONFIG, make_repository

from tests import fuzzing

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VERSION = fuzzing.simple_version(SIMPLE_CONFIG.format(name="simple", max_batch=8))


@pytest.mark.slow
@settings(FUZZ, max_examples=2500)
@given(fuzzing.http_bodies())
def test_http_decoder_refuses_only_with_client_errors(body: tuple[bytes, int | None]) -> None:
    fuzzing.checked(lambda: fuzzing.decode_http(VERSION, *body))


@settings(FUZZ, max_examples=2500)
@given(fuzzing.grpc_messages())
def test_grpc_decoder_refuses_only_with_client_errors(wire: bytes) -> None:
    fuzzing.checked(lambda: fuzzing.decode_grpc(VERSION, wire))


@pytest.fixture(scope="module")
def simple_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repository(tmp_path_factory.mktemp("fuzz-source"), with_torch=False)
    return root / "simple" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def location(simple_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return fuzzing.simple_location(tmp_path_factory.mktemp("fuzz-repo"), simple_model)


@settings(FUZZ, max_examples=600)
@given(document=fuzzing.config_overrides)
def test_config_overrides_refuse_only_with_client_errors(location, document: dict) -> None:  # type: ignore[no-untyped-def]
    fuzzing.checked(lambda: fuzzing.load_override(location, document))
