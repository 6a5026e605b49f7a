"""Prometheus exposition under Triton's metric names, plus enginehouse's own.

Rendered by prometheus_client through a collector that reads, at scrape time, the same
statistics the statistics API reports, so the request path pays nothing for them. Triton's
names, types and labels (``model``, ``version``; ``gpu_uuid`` for GPUs) are kept so existing
dashboards work; what Triton lacks is prefixed ``enginehouse_``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from enginehouse.core.model import ModelVersion
from enginehouse.observe.system import SystemMonitor
from enginehouse.scheduler.statistics import ModelStatistics

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


class _Families:
    """Metric families under construction, in the order they are exposed."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def family(self, name: str, kind: str, help_text: str) -> Metric:
        # A plain Metric keeps Triton's counter names as they are (no "_total" appended).
        metric = Metric(name, help_text, kind)
        self.families.append(metric)
        return metric


class ServerCollector(Collector):
    """A prometheus_client collector that reads the served versions, the load outcomes and
    the machine at scrape time: the request path updates no metric objects."""

    def __init__(
        self,
        versions: Callable[[], Iterable[ModelVersion]],
        monitor: SystemMonitor | None,
        options: MetricsOptions,
        load_outcomes: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self._versions = versions
        self._monitor = monitor
        self._options = options
        self._load_outcomes = load_outcomes

    def collect(self) -> Iterator[Metric]:
        yield from families(self._versions(), self._monitor, self._options, self._load_outcomes)


def render(
    versions: Iterable[ModelVersion],
    monitor: SystemMonitor | None,
    options: MetricsOptions = MetricsOptions(),
    load_outcomes: Mapping[tuple[str, str], int] | None = None,
) -> bytes:
    """The exposition text (Prometheus text format 0.0.4) for every served model version,
    model loads and the machine."""
    registry = CollectorRegistry(auto_describe=False)
    served = list(versions)
    registry.register(ServerCollector(lambda: served, monitor, options, load_outcomes))
    return _triton_counter_names(generate_latest(registry))


# prometheus_client names every counter family "<name>_total" in its HELP and TYPE lines;
# Triton's counters have no such suffix (their samples keep their names either way), and
# dashboards built on Triton read them by those names: the two header lines are renamed back.
_TRITON_COUNTER_HEADERS = tuple(
    (
        (f"# HELP {name}_total ".encode(), f"# HELP {name} ".encode()),
        (f"# TYPE {name}_total counter".encode(), f"# TYPE {name} counter".encode()),
    )
    for name in [*(name for name, _, _ in _COUNTERS), "enginehouse_instance_wait_duration_us"]
)


def _triton_counter_names(text: bytes) -> bytes:
    for help_line, type_line in _TRITON_COUNTER_HEADERS:
        text = text.replace(*help_line, 1).replace(*type_line, 1)
    return text


def families(
    versions: Iterable[ModelVersion],
    monitor: SystemMonitor | None,
    options: MetricsOptions = MetricsOptions(),
    load_outcomes: Mapping[tuple[str, str], int] | None = None,
) -> list[Metric]:
    """The metric families for every served model version, model loads and the machine."""
    served = list(versions)
    out = _Families()
    labelled = [({"model": v.name, "version": v.version}, v) for v in served]

    for name, help_text, read in _COUNTERS:
        metric = out.family(name, "counter", help_text)
        for labels, version in labelled:
            metric.add_sample(name, labels, read(version.statistics))

    metric = out.family(
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model.",
    )
    for labels, version in labelled:
        metric.add_sample("nv_inference_pending_request_count", labels, version.scheduler.in_flight)

    if options.summary_latencies:
        _summaries(out, labelled)

    metric = out.family(
        "enginehouse_instances",
        "gauge",
        "Execution instances of a model version by state (warming, idle, busy, failed)",
    )
    for labels, version in labelled:
        instances = version.scheduler.instances
        for state, count in (
            ("warming", instances.warming),
            ("idle", instances.pool.idle),
            ("busy", instances.pool.busy),
            ("failed", instances.failed),
        ):
            metric.add_sample("enginehouse_instances", labels | {"state": state}, count)

    metric = out.family(
        "enginehouse_queue_size", "gauge", "Requests waiting in the dynamic batcher's queue"
    )
    for labels, version in labelled:
        metric.add_sample("enginehouse_queue_size", labels, version.scheduler.queued)

    metric = out.family(
        "enginehouse_instance_wait_duration_us",
        "counter",
        "Cumulative time spent waiting for a free instance, in microseconds",
    )
    for labels, version in labelled:
        metric.add_sample(
            "enginehouse_instance_wait_duration_us",
            labels,
            version.scheduler.instances.pool.wait_ns // 1000,
        )

    metric = out.family(
        "enginehouse_health_checks",
        "counter",
        "Health-check inferences that idle instances passed",
    )
    for labels, version in labelled:
        metric.add_sample(
            "enginehouse_health_checks_total", labels, version.scheduler.instances.health_checks
        )

    metric = out.family(
        "enginehouse_warmup_seconds",
        "gauge",
        "Seconds each instance spent in warm-up before it served",
    )
    for labels, version in labelled:
        for instance in version.scheduler.instances.all():
            metric.add_sample(
                "enginehouse_warmup_seconds",
                labels | {"instance": instance.name},
                round(instance.warmup_seconds, 6),
            )

    metric = out.family("enginehouse_batch_size", "histogram", "Batch size of each model execution")
    for labels, version in labelled:
        batches = version.statistics.batches
        for bound in BATCH_BUCKETS:
            count = sum(b.compute_infer.count for size, b in batches.items() if size <= bound)
            metric.add_sample("enginehouse_batch_size_bucket", labels | {"le": str(bound)}, count)
        total = sum(b.compute_infer.count for b in batches.values())
        elements = sum(size * b.compute_infer.count for size, b in batches.items())
        metric.add_sample("enginehouse_batch_size_bucket", labels | {"le": "+Inf"}, total)
        metric.add_sample("enginehouse_batch_size_sum", labels, elements)
        metric.add_sample("enginehouse_batch_size_count", labels, total)

    metric = out.family(
        "enginehouse_instance_memory_bytes",
        "gauge",
        "Device memory one instance took when it loaded (GPU instances), per device.",
    )
    for labels, version in labelled:
        for device, size in version.instance_memory.items():
            metric.add_sample(
                "enginehouse_instance_memory_bytes", labels | {"device": device}, size
            )

    if load_outcomes:
        metric = out.family(
            "enginehouse_model_loads",
            "counter",
            "Loads and reloads of a model (incl. polling), by outcome (success, failure).",
        )
        for (model, outcome), count in sorted(load_outcomes.items()):
            metric.add_sample(
                "enginehouse_model_loads_total",
                {"model": model, "outcome": outcome},
                count,
            )
    if monitor is not None:
        _system(out, monitor)
    return out.families


def _summaries(out: _Families, labelled: list[tuple[dict[str, str], ModelVersion]]) -> None:
    arrays = {}
    for _, version in labelled:
        recent = version.statistics.recent
        if recent:
            arrays[id(version)] = np.asarray(recent, dtype=np.float64) / 1000.0
    for column, (name, help_text) in enumerate(_SUMMARIES):
        metric = out.family(name, "summary", help_text)
        for labels, version in labelled:
            stats = version.statistics
            data = arrays.get(id(version))
            if data is not None:
                values = np.quantile(data[:, column], QUANTILES)
                for q, value in zip(QUANTILES, values):
                    metric.add_sample(name, labels | {"quantile": str(q)}, round(float(value), 3))
            durations = (
                stats.success,
                stats.queue,
                stats.compute_input,
                stats.compute_infer,
                stats.compute_output,
            )[column]
            metric.add_sample(f"{name}_sum", labels, durations.ns / 1000.0)
            metric.add_sample(f"{name}_count", labels, durations.count)


def _system(out: _Families, monitor: SystemMonitor) -> None:
    metric = out.family("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]")
    metric.add_sample("nv_cpu_utilization", {}, round(monitor.cpu_utilization(), 4))
    total, used = monitor.memory()
    metric = out.family("nv_cpu_memory_total_bytes", "gauge", "CPU total memory (RAM), in bytes")
    metric.add_sample("nv_cpu_memory_total_bytes", {}, total)
    metric = out.family("nv_cpu_memory_used_bytes", "gauge", "CPU used memory (RAM), in bytes")
    metric.add_sample("nv_cpu_memory_used_bytes", {}, used)
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
        metric = out.family(name, kind, help_text)
        for gpu in gpus:
            metric.add_sample(name, {"gpu_uuid": gpu.uuid}, read(gpu))
