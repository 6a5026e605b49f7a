"""Admission and draining, with ServerCore in process.

Draining means no admitted request fails: a request admitted and an unload started before it
runs, in the exact order that a loaded machine produces now and then (the request then met
an instance whose thread was already shut down). Admission is bounded: past the per-model
pending limits a request gets UNAVAILABLE at once."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from make_repository import SIMPLE_CONFIG

from enginehouse.builder.cache import EngineCache
from enginehouse.core.server import ControlMode, ServerCore
from enginehouse.errors import UnavailableError
from enginehouse.messages import InferInput, InferRequest, InferResponse
from enginehouse.repository import ModelRepository
from enginehouse.scheduler.base import PendingLimits

NEVER_INLINE = 'parameters { key: "inline_execution" value: { string_value: "never" } }\n'
BATCHED = "dynamic_batching { max_queue_delay_microseconds: 0 }\n"


def _repository(example_repo: Path, tmp_path: Path, extra: str) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(example_repo / "simple" / "1", root / "simple" / "1")
    (root / "simple" / "config.pbtxt").write_text(
        SIMPLE_CONFIG.format(name="simple", max_batch=8) + NEVER_INLINE + extra
    )
    return root


async def _started(root: Path, cache: Path, limits: PendingLimits | None = None) -> ServerCore:
    """A started in-process ServerCore in explicit mode with ``simple`` loaded."""
    core = ServerCore(
        ModelRepository([root]),
        control_mode=ControlMode.EXPLICIT,
        startup_models=["simple"],
        engine_cache=EngineCache(cache / "cache"),
        pending_limits=limits,
    )
    await core.start()
    return core


def _request() -> InferRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    return InferRequest(
        "simple",
        [InferInput("INPUT0", "INT32", a.shape, a), InferInput("INPUT1", "INT32", a.shape, a)],
    )


@pytest.mark.parametrize("scheduling", ["default", "dynamic_batching"])
def test_requests_admitted_before_an_unload_are_answered(
    example_repo: Path, tmp_path: Path, scheduling: str
) -> None:
    root = _repository(example_repo, tmp_path, BATCHED if scheduling != "default" else "")

    async def scenario() -> None:
        core = await _started(root, tmp_path)
        assert core.ready
        for _ in range(3):
            admitted = [core.submit(_request()) for _ in range(4)]
            unload = asyncio.create_task(core.unload_model("simple"))
            # Give the unload every chance to finish first, as it did when it raced ahead.
            await asyncio.wait([unload], timeout=0.5)
            for result in admitted:
                response = result if isinstance(result, InferResponse) else await result
                np.testing.assert_array_equal(
                    response.outputs[0].data, 2 * np.arange(16, dtype=np.int32).reshape(1, 16)
                )
            await unload
            assert not core.model_ready("simple")
            await core.load_model("simple")
        await core.stop(5.0)

    asyncio.run(scenario())


@pytest.mark.parametrize("scheduling", ["default", "dynamic_batching"])
@pytest.mark.parametrize("bound", ["requests", "bytes"])
def test_past_the_pending_limit_requests_are_refused_at_once(
    example_repo: Path, tmp_path: Path, scheduling: str, bound: str
) -> None:
    root = _repository(example_repo, tmp_path, BATCHED if scheduling != "default" else "")
    request_bytes = 2 * 16 * 4
    limits = (
        PendingLimits(max_requests=3)
        if bound == "requests"
        else PendingLimits(max_bytes=3 * request_bytes)
    )

    async def scenario() -> None:
        core = await _started(root, tmp_path, limits)
        admitted = [core.submit(_request()) for _ in range(3)]
        with pytest.raises(UnavailableError, match="pending"):
            core.submit(_request())
        for result in admitted:
            if not isinstance(result, InferResponse):
                await result
        version = core.resolve("simple")
        assert (version.scheduler.in_flight, version.scheduler.pending_bytes) == (0, 0)
        await core.infer(_request())  # served again once the others are answered
        await core.stop(5.0)

    asyncio.run(scenario())
