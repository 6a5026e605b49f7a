"""The core's three parts alone, over a repository of fake models: the registry (what
serves), the lifecycle (loading, reloading, unloading) and the data plane (requests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from enginehouse.core.data_plane import DataPlane
from enginehouse.core.lifecycle import ControlMode, Lifecycle, LoadSettings
from enginehouse.core.registry import ModelRegistry, VersionState
from enginehouse.errors import ModelLoadError, NotFoundError, UnavailableError
from enginehouse.messages import InferInput, InferRequest
from enginehouse.repository import ModelRepository
from enginehouse.testing.fake_backend import controls, write_model


def _parts(root: Path) -> tuple[ModelRegistry, Lifecycle, DataPlane]:
    registry = ModelRegistry()
    lifecycle = Lifecycle(
        ModelRepository([root]), registry, ControlMode.EXPLICIT, LoadSettings(warmup=False)
    )
    return registry, lifecycle, DataPlane(registry)


def _request(model: str, value: float = 1.0, version: str = "") -> InferRequest:
    data = np.full((1, 4), value, np.float32)
    return InferRequest(model, [InferInput("INPUT0", "FP32", data.shape, data)], version)


def test_registry_answers_from_what_was_published(tmp_path: Path) -> None:
    write_model(tmp_path, "m", versions=(1, 2))

    async def scenario() -> None:
        registry, lifecycle, _ = _parts(tmp_path)
        with pytest.raises(NotFoundError):
            registry.resolve("m")
        await lifecycle.load(lifecycle.repository.locate("m"))
        assert registry.model_ready("m") and registry.model_ready("m", "2")
        assert not registry.model_ready("m", "1")  # the default policy serves the latest
        assert registry.resolve("m").version == "2"
        assert [(e.version, e.state) for e in registry.index(["m"])] == [("2", "READY")]
        assert registry.all_ready()
        registry.record("m").loading = True
        withdrawn = registry.withdraw("m")
        assert withdrawn is not None
        with pytest.raises(UnavailableError, match="loading"):
            registry.resolve("m")
        for version in withdrawn.versions.values():
            await version.shutdown()

    asyncio.run(scenario())


def test_a_failed_reload_keeps_the_serving_version(tmp_path: Path) -> None:
    write_model(tmp_path, "m")

    async def scenario() -> None:
        registry, lifecycle, data = _parts(tmp_path)
        await lifecycle.load_model("m")
        serving = registry.resolve("m")
        write_model(tmp_path, "m", extra="# changed")  # a new identity: the reload loads
        controls("m").load_error = "no memory left"
        with pytest.raises(ModelLoadError, match="keep serving"):
            await lifecycle.load_model("m")
        assert registry.resolve("m") is serving
        state, reason = registry.records["m"].states["1"]
        assert state == VersionState.READY and "no memory left" in reason
        answer = await data.infer(_request("m", 3.0))
        assert np.all(answer.outputs[0].data == 3.0)
        assert lifecycle.load_outcomes["m", "failure"] == 1
        await lifecycle.unload_all()

    asyncio.run(scenario())


def test_unload_answers_the_requests_admitted_before_it(tmp_path: Path) -> None:
    write_model(tmp_path, "m")

    async def scenario() -> None:
        registry, lifecycle, data = _parts(tmp_path)
        await lifecycle.load_model("m")
        fake = controls("m")
        fake.latency_s = 0.1
        admitted = [asyncio.ensure_future(data.infer(_request("m", i))) for i in range(3)]
        await asyncio.sleep(0)
        await lifecycle.unload_model("m")
        for i, task in enumerate(admitted):
            assert np.all((await task).outputs[0].data == i)
        with pytest.raises(NotFoundError):
            data.submit(_request("m"))
        assert registry.records["m"].states["1"] == (VersionState.UNAVAILABLE, "unloaded")
        assert fake.closes == fake.loads == 1

    asyncio.run(scenario())


def test_a_draining_data_plane_refuses_new_requests(tmp_path: Path) -> None:
    write_model(tmp_path, "m")

    async def scenario() -> None:
        registry, lifecycle, data = _parts(tmp_path)
        await lifecycle.load_model("m")
        assert data.model_metadata("m").versions == ("1",)
        assert [s.version for s in data.model_statistics("m")] == ["1"]
        data.draining = True
        with pytest.raises(UnavailableError, match="shutting down"):
            data.submit(_request("m"))
        await lifecycle.unload_all()
        assert not registry.served

    asyncio.run(scenario())
