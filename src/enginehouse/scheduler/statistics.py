"""Per-model-version statistics with Triton's semantics and both of its shapes.

Every figure is a real measurement in nanoseconds. ``inference_count`` counts batch
elements, ``execution_count`` counts executions; ``batch_stats`` are kept per batch size
of an execution. Updates happen on the event loop thread only, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    """A count and the total nanoseconds of something that happened ``count`` times."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStatistics:
    """Compute times of the executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


_INFERENCE_STATS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@dataclass(slots=True)
class ModelStatistics:
    """The statistics of one model version since it was loaded."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStatistics] = field(default_factory=dict)
    # Recent (total, queue, input, infer, output) ns per request, kept only when latency
    # summaries are asked for (``--metrics-config summary_latencies=true``).
    recent: deque[tuple[int, int, int, int, int]] | None = None

    def keep_recent(self, count: int) -> None:
        """Start keeping the last ``count`` requests' latencies for summaries."""
        self.recent = deque(maxlen=count)

    def record_execution(
        self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One execution of ``batch_size`` elements (batch_size 1 for non-batching models)."""
        self.execution_count += 1
        self.inference_count += batch_size
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = BatchStatistics()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_success(
        self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One request that completed; its compute times are its share of the execution."""
        self.record_successes([total_ns], [queue_ns], input_ns, infer_ns, output_ns)

    def record_successes(
        self,
        totals_ns: list[int],
        queues_ns: list[int],
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        """The requests of one batch that completed together: :meth:`record_success` for
        each, in one call (the batcher's per-request cost counts at thousands a second)."""
        count = len(totals_ns)
        self.success.add(sum(totals_ns), count)
        self.queue.add(sum(queues_ns), count)
        self.compute_input.add(input_ns * count, count)
        self.compute_infer.add(infer_ns * count, count)
        self.compute_output.add(output_ns * count, count)
        self.last_inference_ms = time.time_ns() // 1_000_000
        if self.recent is not None:
            for total, queue in zip(totals_ns, queues_ns):
                self.recent.append((total, queue, input_ns, infer_ns, output_ns))

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def as_dict(self) -> dict[str, Any]:
        """Triton's JSON shape of one ``model_stats`` entry."""
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {key: getattr(self, key).as_dict() for key in _INFERENCE_STATS},
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": batch.compute_input.as_dict(),
                    "compute_infer": batch.compute_infer.as_dict(),
                    "compute_output": batch.compute_output.as_dict(),
                }
                for size, batch in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
