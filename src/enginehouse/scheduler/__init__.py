"""How requests reach instances: the scheduler interface, its two implementations (default
and dynamic batching), the instance pool and its supervisor, and the statistics they keep."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.config.tensors import output_specs
from enginehouse.scheduler.base import PendingLimits, Responses, Scheduler, Work
from enginehouse.scheduler.default import DefaultScheduler
from enginehouse.scheduler.dynamic import DynamicBatchScheduler
from enginehouse.scheduler.instances import InstanceSupervisor
from enginehouse.scheduler.queue import BatchingPolicy


def scheduler_for(
    config: mc.ModelConfig,
    version: str,
    instances: InstanceSupervisor,
    limits: PendingLimits | None = None,
) -> Scheduler:
    """The scheduler a config asks for: the dynamic batcher where it batches and has a
    ``dynamic_batching`` block, the default scheduler otherwise (as in Triton)."""
    batching = config.max_batch_size > 0
    responses = Responses(config.name, version, output_specs(config), batching)
    limits = limits or PendingLimits()
    if batching and config.HasField("dynamic_batching"):
        return DynamicBatchScheduler(
            responses, instances, limits, BatchingPolicy.from_config(config)
        )
    return DefaultScheduler(responses, instances, limits)


__all__ = [
    "DefaultScheduler",
    "DynamicBatchScheduler",
    "InstanceSupervisor",
    "PendingLimits",
    "Scheduler",
    "Work",
    "scheduler_for",
]
