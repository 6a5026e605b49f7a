"""Prometheus text exposition under Triton's metric names, plus enginehouse's own.

Per-model figures are read at scrape time from the same statistics the statistics API
reports, so the request path pays nothing for them. Triton's names, types and labels
(``model``, ``version``; ``gpu_uuid`` for GPUs) are kept so existing dashboards work;
what Triton lacks is prefixed ``enginehouse_``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from enginehouse.core.model import ModelVersion
from enginehouse.core.statistics import ModelStatistics
from enginehouse.observe.system import SystemMonitor

QUANTILES = (0.5, 0.9, 0.95, 0.99)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_COUNTERS: tuple[tuple[str, str, Callable[[ModelStatistics], int]], ...] = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success.count,
    ),
    (
        "nv_inference_request_failure",
        "Number of failed inference requests, all batch sizes",
        lambda s: s.fail.count,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        lambda s: s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds",
        lambda s: s.success.ns // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds",
        lambda s: s.compute_output.ns // 1000,
    ),
)

_SUMMARIES = (
    ("nv_inference_request_summary_us", "Summary of inference request duration in microseconds"),
    ("nv_inference_queue_summary_us", "Summary of inference queuing duration in microseconds"),
    ("nv_inference_compute_input_summary_us", "Summary of compute input duration in microseconds"),
    (
        "nv_inference_compute_infer_summary_us",
        "Summary of compute inference duration in microseconds",
    ),
    (
        "nv_inference_compute_output_summary_us",
        "Summary of compute output duration in microseconds",
    ),
)


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    """What ``--metrics-config`` turned on."""

    summary_latencies: bool = False
    summary_window: int = 1024


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        number = repr(value) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")


def render(
    versions: Iterable[ModelVersion],
    monitor: SystemMonitor | None,
    options: MetricsOptions = MetricsOptions(),
    load_outcomes: Mapping[tuple[str, str], int] | None = None,
) -> bytes:
    """The exposition text for every served model version, model loads and the machine."""
    served = list(versions)
    out = _Text()
    labelled = [({"model": v.name, "version": v.version}, v) for v in served]

    for name, help_text, read in _COUNTERS:
        out.family(name, "counter", help_text)
        for labels, version in labelled:
            out.sample(name, labels, read(version.statistics))

    out.family(
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model.",
    )
    for labels, version in labelled:
        out.sample("nv_inference_pending_request_count", labels, version.in_flight)

    if options.summary_latencies:
        _summaries(out, labelled)

    out.family(
        "enginehouse_instances",
        "gauge",
        "Execution instances of a model version by state (warming, idle, busy, failed)",
    )
    for labels, version in labelled:
        pool = version.pool
        for state, count in (
            ("warming", version.warming_instances),
            ("idle", pool.idle),
            ("busy", pool.busy),
            ("failed", version.failed_instances),
        ):
            out.sample("enginehouse_instances", labels | {"state": state}, count)

    out.family("enginehouse_queue_size", "gauge", "Requests waiting in the dynamic batcher's queue")
    for labels, version in labelled:
        queued = version.batched.batcher.queue.size if version.batched else version.pool.waiting
        out.sample("enginehouse_queue_size", labels, queued)

    out.family(
        "enginehouse_instance_wait_duration_us",
        "counter",
        "Cumulative time spent waiting for a free instance, in microseconds",
    )
    for labels, version in labelled:
        out.sample("enginehouse_instance_wait_duration_us", labels, version.pool.wait_ns // 1000)

    out.family(
        "enginehouse_health_checks_total",
        "counter",
        "Health-check inferences that idle instances passed",
    )
    for labels, version in labelled:
        out.sample("enginehouse_health_checks_total", labels, version.health_checks)

    out.family(
        "enginehouse_warmup_seconds",
        "gauge",
        "Seconds each instance spent in warm-up before it served",
    )
    for labels, version in labelled:
        for instance in version.pool.all():
            out.sample(
                "enginehouse_warmup_seconds",
                labels | {"instance": instance.name},
                round(instance.warmup_seconds, 6),
            )

    out.family("enginehouse_batch_size", "histogram", "Batch size of each model execution")
    for labels, version in labelled:
        batches = version.statistics.batches
        total = 0
        for bound in BATCH_BUCKETS:
            count = sum(b.compute_infer.count for size, b in batches.items() if size <= bound)
            out.sample("enginehouse_batch_size_bucket", labels | {"le": str(bound)}, count)
        total = sum(b.compute_infer.count for b in batches.values())
        elements = sum(size * b.compute_infer.count for size, b in batches.items())
        out.sample("enginehouse_batch_size_bucket", labels | {"le": "+Inf"}, total)
        out.sample("enginehouse_batch_size_sum", labels, elements)
        out.sample("enginehouse_batch_size_count", labels, total)

    out.family(
        "enginehouse_instance_memory_bytes",
        "gauge",
        "Device memory one instance took when it loaded (GPU instances), per device.",
    )
    for labels, version in labelled:
        for device, size in version.instance_memory.items():
            out.sample("enginehouse_instance_memory_bytes", labels | {"device": device}, size)

    if load_outcomes:
        out.family(
            "enginehouse_model_loads_total",
            "counter",
            "Loads and reloads of a model (incl. polling), by outcome (success, failure).",
        )
        for (model, outcome), count in sorted(load_outcomes.items()):
            out.sample("enginehouse_model_loads_total", {"model": model, "outcome": outcome}, count)
    if monitor is not None:
        _system(out, monitor)
    return ("\n".join(out.lines) + "\n").encode()


def _summaries(out: _Text, labelled: list[tuple[dict[str, str], ModelVersion]]) -> None:
    arrays = {}
    for _, version in labelled:
        recent = version.statistics.recent
        if recent:
            arrays[id(version)] = np.asarray(recent, dtype=np.float64) / 1000.0
    for column, (name, help_text) in enumerate(_SUMMARIES):
        out.family(name, "summary", help_text)
        for labels, version in labelled:
            stats = version.statistics
            data = arrays.get(id(version))
            if data is not None:
                values = np.quantile(data[:, column], QUANTILES)
                for q, value in zip(QUANTILES, values):
                    out.sample(name, labels | {"quantile": str(q)}, round(float(value), 3))
            durations = (
                stats.success,
                stats.queue,
                stats.compute_input,
                stats.compute_infer,
                stats.compute_output,
            )[column]
            out.sample(f"{name}_sum", labels, durations.ns / 1000.0)
            out.sample(f"{name}_count", labels, durations.count)


def _system(out: _Text, monitor: SystemMonitor) -> None:
    out.family("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]")
    out.sample("nv_cpu_utilization", {}, round(monitor.cpu_utilization(), 4))
    total, used = monitor.memory()
    out.family("nv_cpu_memory_total_bytes", "gauge", "CPU total memory (RAM), in bytes")
    out.sample("nv_cpu_memory_total_bytes", {}, total)
    out.family("nv_cpu_memory_used_bytes", "gauge", "CPU used memory (RAM), in bytes")
    out.sample("nv_cpu_memory_used_bytes", {}, used)
    gpus = monitor.gpus()
    if not gpus:
        return
    for name, kind, help_text, read in (
        (
            "nv_gpu_utilization",
            "gauge",
            "GPU utilization rate [0.0 - 1.0)",
            lambda g: round(g.utilization, 4),
        ),
        (
            "nv_gpu_memory_total_bytes",
            "gauge",
            "GPU total memory, in bytes",
            lambda g: g.memory_total,
        ),
        ("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes", lambda g: g.memory_used),
        (
            "nv_gpu_power_usage",
            "gauge",
            "GPU power usage in watts",
            lambda g: round(g.power_watts, 3),
        ),
        (
            "nv_gpu_power_limit",
            "gauge",
            "GPU power management limit in watts",
            lambda g: round(g.power_limit_watts, 3),
        ),
    ):
        out.family(name, kind, help_text)
        for gpu in gpus:
            out.sample(name, {"gpu_uuid": gpu.uuid}, read(gpu))
