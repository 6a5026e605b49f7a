"""The two schedulers alone, on fake engines: no server, no frontend, no model file.

What each test asserts is what the scheduler decided (batches formed, counts, failures,
replacements), read from the fake engine's record of what it ran, never from timings."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import Placement
from enginehouse.config.model_config import parse_config_text
from enginehouse.errors import InternalError, UnavailableError
from enginehouse.messages import InferInput, InferRequest, InferResponse
from enginehouse.runtime.instance import InlinePolicy, Instance
from enginehouse.scheduler import (
    DefaultScheduler,
    DynamicBatchScheduler,
    InstanceSupervisor,
    PendingLimits,
    Scheduler,
    Work,
    scheduler_for,
)
from enginehouse.testing.fake_backend import FAKE_CONFIG, FakeControls, FakeEngine, controls

CPU = Placement(mc.ModelInstanceGroup.KIND_CPU)


def _config(name: str, extra: str = "", count: int = 1) -> mc.ModelConfig:
    text = FAKE_CONFIG.format(name=name, max_batch_size=8, dims="4", count=count, extra=extra)
    return parse_config_text(text, name)


def _scheduler(
    name: str, extra: str = "", count: int = 1, limits: PendingLimits | None = None
) -> tuple[Scheduler, FakeControls]:
    config = _config(name, extra, count)
    fake = controls(name)

    def make(instance: str, placement: Placement) -> Instance:
        return Instance(
            instance, FakeEngine(fake, config, placement), placement, InlinePolicy("never")
        )

    supervisor = InstanceSupervisor(name, [make(f"{name}_{i}", CPU) for i in range(count)], make)
    return scheduler_for(config, "1", supervisor, limits), fake


def _work(rows: int, value: float, model: str = "m") -> Work:
    data = np.full((rows, 4), value, np.float32)
    request = InferRequest(model, [InferInput("INPUT0", "FP32", data.shape, data)])
    return Work(request, {"INPUT0": data}, ("OUTPUT0",), rows, 1, data.nbytes)


async def _answer(result: InferResponse | asyncio.Future[InferResponse]) -> InferResponse:
    return result if isinstance(result, InferResponse) else await result


def test_the_config_chooses_the_scheduler() -> None:
    assert isinstance(_scheduler("plain")[0], DefaultScheduler)
    batched, _ = _scheduler("batched", "dynamic_batching { }")
    assert isinstance(batched, DynamicBatchScheduler)


def test_default_scheduler_runs_requests_one_by_one_and_counts_the_waiting() -> None:
    async def scenario() -> None:
        scheduler, fake = _scheduler("one_by_one")
        fake.latency_s = 0.05
        # The default scheduler answers with coroutines: as a frontend does, run them.
        pending = [asyncio.ensure_future(scheduler.submit(_work(2, float(i)))) for i in range(3)]  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert (scheduler.in_flight, scheduler.queued) == (3, 2)
        answers = [await _answer(p) for p in pending]
        for i, answer in enumerate(answers):
            assert np.all(answer.outputs[0].data == i)
        assert fake.batches == [2, 2, 2]
        assert (scheduler.in_flight, scheduler.pending_bytes, scheduler.queued) == (0, 0, 0)
        assert scheduler.statistics.execution_count == 3
        assert scheduler.statistics.success.count == 3

    asyncio.run(scenario())


def test_dynamic_batcher_merges_waiting_requests_and_splits_the_answers() -> None:
    async def scenario() -> None:
        scheduler, fake = _scheduler("merged", "dynamic_batching { }")
        fake.latency_s = 0.05
        pending = [scheduler.submit(_work(1, float(i))) for i in range(6)]
        answers = [await _answer(p) for p in pending]
        for i, answer in enumerate(answers):
            assert answer.outputs[0].data.shape == (1, 4)
            assert np.all(answer.outputs[0].data == i)
        assert sum(fake.batches) == 6 and max(fake.batches) > 1, fake.batches
        assert scheduler.statistics.execution_count == len(fake.batches)
        assert scheduler.statistics.inference_count == 6

    asyncio.run(scenario())


@pytest.mark.parametrize("extra", ["", "dynamic_batching { }"], ids=["default", "dynamic"])
def test_a_backend_failure_fails_its_requests_and_the_instance_is_replaced(extra: str) -> None:
    async def scenario() -> None:
        scheduler, fake = _scheduler("failing", extra)
        fake.fail_next = 1
        with pytest.raises(InternalError, match="failure asked for"):
            await _answer(scheduler.submit(_work(1, 1.0)))
        supervisor = scheduler.instances
        assert supervisor.failed == 1
        for _ in range(200):
            if supervisor.replacements:
                break
            await asyncio.sleep(0.01)
        assert supervisor.replacements == 1 and len(supervisor.all()) == 1
        answer = await _answer(scheduler.submit(_work(1, 2.0)))
        assert np.all(answer.outputs[0].data == 2.0)
        assert (scheduler.statistics.fail.count, scheduler.statistics.success.count) == (1, 1)
        assert fake.loads == 0 and fake.closes == 1  # made here directly; the failed one closed

    asyncio.run(scenario())


@pytest.mark.parametrize("extra", ["", "dynamic_batching { }"], ids=["default", "dynamic"])
def test_past_the_pending_limit_work_is_refused_at_once(extra: str) -> None:
    async def scenario() -> None:
        scheduler, fake = _scheduler("limited", extra, limits=PendingLimits(max_requests=2))
        fake.latency_s = 0.05
        admitted = [scheduler.submit(_work(1, 1.0)) for _ in range(2)]
        with pytest.raises(UnavailableError, match="pending"):
            scheduler.submit(_work(1, 1.0))
        for result in admitted:
            await _answer(result)
        assert scheduler.statistics.fail.count == 1
        await _answer(scheduler.submit(_work(1, 1.0)))

    asyncio.run(scenario())


def test_closing_fails_the_queue_and_lets_the_running_batch_finish() -> None:
    async def scenario() -> None:
        scheduler, fake = _scheduler("closing", "dynamic_batching { }")
        fake.hang.set()
        running = scheduler.submit(_work(1, 1.0))
        await asyncio.sleep(0.02)
        queued = [scheduler.submit(_work(1, 2.0)) for _ in range(3)]
        await asyncio.sleep(0.02)
        assert scheduler.queued == 3
        closing = asyncio.ensure_future(scheduler.close())
        for result in queued:
            with pytest.raises(UnavailableError, match="unloading"):
                await _answer(result)
        assert not closing.done()  # the running batch holds the close
        fake.hang.clear()
        await closing
        assert np.all((await _answer(running)).outputs[0].data == 1.0)
        await scheduler.drain()
        assert scheduler.in_flight == 0

    asyncio.run(scenario())
