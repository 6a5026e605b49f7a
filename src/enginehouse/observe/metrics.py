"""Prometheus text exposition of the per-model counters, under Triton's metric names.

The figures are read from the same statistics the statistics API reports, at scrape
time, so the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable

from enginehouse.core.statistics import ModelStatistics

# (name, help, reader) for each per-model counter Triton exports.
_COUNTERS = (
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
        "Number of inferences performed (batch elements)",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed",
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: Iterable[ModelStatistics], pending: dict[tuple[str, str], int]) -> bytes:
    """The exposition text for every served model version."""
    rows = list(stats)
    lines: list[str] = []
    for name, help_text, read in _COUNTERS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} counter")
        for s in rows:
            lines.append(
                f'{name}{{model="{_escape(s.name)}",version="{_escape(s.version)}"}} {read(s)}'
            )
    lines.append(
        "# HELP nv_inference_pending_request_count Instantaneous number of pending requests"
    )
    lines.append("# TYPE nv_inference_pending_request_count gauge")
    for (model, version), count in sorted(pending.items()):
        lines.append(
            f'nv_inference_pending_request_count{{model="{_escape(model)}",'
            f'version="{_escape(version)}"}} {count}'
        )
    return ("\n".join(lines) + "\n").encode()
