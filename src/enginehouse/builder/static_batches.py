"""Fixed-batch GPU engines beside the one of symbolic batch: built, checked, measured, and
kept only where faster.

Inductor compiles a graph of symbolic batch with kernels that must serve every batch size.
Exported with the batch fixed, the same program gets tiles, layouts and launch grids chosen
for that size: ResNet-50 fp16 at batch 256 replayed 5.7-9.3% faster so on an H200
(9.16-9.22 against 9.75-10.04 ms; 1.66-1.68x eager fp16, against 1.49x for the symbolic
engine alone). Each costs a build (an export and a compile) and a load, so only the sizes a
config names in ``engine_static_batch_sizes`` are built, and each is kept only where its CUDA
graph replays at least ``MIN_GAIN`` faster than the symbolic engine's at that batch, timed
on the build's device in alternating rounds, and where its answers match the symbolic
engine's within the build's tolerance. What was measured, kept or not, goes into the
engine's ``static_batches.json`` (and the build's log).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from enginehouse.backends import inductor_artifact
from enginehouse.backends.graph_setup import captured_cublas_workspace
from enginehouse.builder.accuracy import relative_difference
from enginehouse.config.build_spec import BuildSpec

log = logging.getLogger(__name__)

MIN_GAIN = 0.02
ROUNDS = 5
REPLAYS_PER_ROUND = 10


def build(
    torch: Any,
    model: str,
    wrapped: Any,
    example: Callable[[int], tuple[Any, ...]],
    dynamic: Sequence[dict[int, Any]],
    spec: BuildSpec,
    runner: inductor_artifact.ArtifactRunner,
    weights: dict[str, Any],
    out: Path,
    channels_last: bool,
) -> dict[int, dict[str, Any]]:
    """For each of ``spec.static_batches``: export ``wrapped`` at that batch (the other
    dims in ``dynamic`` stay dynamic), compile it, compare and time it against ``runner``,
    and save it where kept. Writes the index either way; returns the kept sizes' facts."""
    kept: dict[int, dict[str, Any]] = {}
    refused: dict[int, dict[str, Any]] = {}
    fixed = tuple({dim: d for dim, d in dims.items() if dim != 0} for dims in dynamic)
    for batch in spec.static_batches:
        started = time.perf_counter()
        inputs = example(batch)
        try:
            exported = torch.export.export(
                wrapped, inputs, dynamic_shapes=(fixed,) if any(fixed) else None
            )
            artifact = inductor_artifact.compile_static(
                torch, exported, weights, spec.autotune, channels_last
            )
            candidate = inductor_artifact.ArtifactRunner(artifact, list(weights.values()))
            with torch.inference_mode():
                error = relative_difference(torch, runner(*inputs), candidate(*inputs))
        except Exception as exc:  # export, Inductor and its shape asserts raise many types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            refused[batch] = {"reason": reason}
            log.warning("model '%s': no fixed-batch engine for batch %d: %s", model, batch, reason)
            continue
        build_s = time.perf_counter() - started
        if error > spec.tolerance:
            refused[batch] = {
                "reason": f"answers differ by {error:.3g}",
                "build_s": round(build_s, 1),
            }
            log.warning(
                "model '%s': the fixed-batch engine for batch %d answers %.3g apart from the "
                "symbolic one (tolerance %g): not kept",
                model,
                batch,
                error,
                spec.tolerance,
            )
            continue
        symbolic_ms, static_ms = replay_times(torch, [runner, candidate], inputs)
        facts = {
            "symbolic_ms": round(symbolic_ms, 4),
            "static_ms": round(static_ms, 4),
            "gain": round(symbolic_ms / static_ms - 1, 4),
            "build_s": round(build_s, 1),
            "relative_difference": error,
        }
        keep = static_ms <= symbolic_ms * (1 - MIN_GAIN)
        if keep:
            inductor_artifact.save_static(artifact, batch, out)
            kept[batch] = facts
        else:
            refused[batch] = {"reason": f"not {MIN_GAIN:.0%} faster", **facts}
        log.info(
            "model '%s': batch %d fixed %.3f ms against %.3f ms symbolic (built in %.1f s): %s",
            model,
            batch,
            static_ms,
            symbolic_ms,
            build_s,
            "kept" if keep else f"not kept (under {MIN_GAIN:.0%} faster)",
        )
    inductor_artifact.write_static_index(out, kept, refused)
    return kept


def replay_times(
    torch: Any, runs: Sequence[Callable[..., Any]], inputs: tuple[Any, ...]
) -> list[float]:
    """Milliseconds per replay of each run's CUDA graph on ``inputs``: every graph replayed
    ``REPLAYS_PER_ROUND`` times a round, in turn, for ``ROUNDS`` rounds, each run's median
    round (the device's clocks drift over seconds; turns put every run through the same)."""
    stream = torch.cuda.Stream()
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    with torch.inference_mode(), torch.cuda.stream(stream):
        for run in runs:
            for _ in range(3):
                run(*inputs)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with (
                captured_cublas_workspace(torch),
                torch.cuda.graph(
                    graph, pool=pool, stream=stream, capture_error_mode="thread_local"
                ),
            ):
                run(*inputs)
            graph.replay()
            graphs.append(graph)
        stream.synchronize()
        rounds: list[list[float]] = [[] for _ in graphs]
        for _ in range(ROUNDS):
            for graph, times in zip(graphs, rounds):
                began = time.perf_counter()
                for _ in range(REPLAYS_PER_ROUND):
                    graph.replay()
                stream.synchronize()
                times.append((time.perf_counter() - began) / REPLAYS_PER_ROUND * 1e3)
    del graphs
    torch.cuda.empty_cache()
    return [statistics.median(times) for times in rounds]
