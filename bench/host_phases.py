"""Where a GPU engine's host-to-host time goes, phase by phase, against its graph replay.

bench/gpu_engines.py gives host to host as one figure. This splits one synchronous
execution of the served CUDA-graph engine into its phases (the copy of the inputs into the
pinned staging buffers, ``gather``; the graph's launch with its done event and wake-up,
``launch``; the wait on the blocking done event; the output copy), and sets beside them a
synchronised bare replay, the engine's own synchronous execution (``execute``: asleep until
shortly before the expected end, then checking the event), the same execution waited for by
polling the event from the launch on, and the execution with 1 to 15 host-copy threads.

Above batch 1 it also splits two instances taking turns (bench/gpu_engines.py's
``TakingTurns``) into the same phases, with the span of each batch's graph on the GPU from
timing events on the instances' streams: once with each call gathering its batch, and once
launching batches staged already (the GPU's part alone). Where the graphs' spans cover the
whole period, the GPU is the limit; where they leave gaps, the host is.

    python bench/host_phases.py [--model resnet50] [--batches 1,256] [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_engines import OUT, PRECISION, build
from gpu_models import MODELS

THREADS = ("1", "4", "8", "12", "15")


def p50_ms(run: Callable[[], Any], iters: int) -> float:
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def note_phases(spent: dict[str, list[float]], *times: float) -> None:
    """Add one execution's phases, from the five times that bound them, to ``spent``."""
    for name, since, until in zip(("gather", "launch", "wait", "outputs"), times, times[1:]):
        spent[name].append(until - since)


def phases(
    engine: Any, parts: dict[str, list[np.ndarray]], outputs: list[str], iters: int
) -> tuple[dict[str, float], float]:
    """p50 ms of each phase of ``iters`` synchronous executions, and of the same
    executions waited for by polling the done event."""
    spent: dict[str, list[float]] = {"gather": [], "launch": [], "wait": [], "outputs": []}
    for _ in range(iters):
        t0 = time.perf_counter()
        staged = engine.gather(parts)
        t1 = time.perf_counter()
        launched = engine.launch(staged, outputs)
        t2 = time.perf_counter()
        engine._done.synchronize()
        t3 = time.perf_counter()
        launched.outputs()
        t4 = time.perf_counter()
        note_phases(spent, t0, t1, t2, t3, t4)

    def polled() -> None:
        launched = engine.launch(engine.gather(parts), outputs)
        while not launched.done():
            pass
        launched.outputs()

    medians = {name: float(np.median(times) * 1e3) for name, times in spent.items()}
    return medians, p50_ms(polled, iters)


def taking_turns(
    torch: Any,
    engines: list[Any],
    parts: dict[str, list[np.ndarray]],
    outputs: list[str],
    iters: int,
    gather: bool,
) -> dict[str, float]:
    """Two instances taking turns as bench/gpu_engines.py's ``TakingTurns`` does: per call,
    ms p50 of each host phase (gather, launch, the wait for the other instance's batch, its
    outputs) and of the whole call (one batch's period), and the mean span of a batch's
    graph on the GPU and the mean gap between one batch's end and the next one's start
    (negative: they overlapped). ``gather`` false launches batches staged beforehand."""
    staged = [engine.gather(parts) for engine in engines]
    spent: dict[str, list[float]] = {"gather": [], "launch": [], "wait": [], "outputs": []}
    periods: list[float] = []
    events: list[tuple[Any, Any]] = []
    pending: Any = None
    for call in range(iters + 2):
        engine = engines[call % 2]
        t0 = time.perf_counter()
        inputs = engine.gather(parts) if gather else staged[call % 2]
        t1 = time.perf_counter()
        began = torch.cuda.Event(enable_timing=True)
        ended = torch.cuda.Event(enable_timing=True)
        began.record(engine.stream)
        launched = engine.launch(inputs, outputs)
        ended.record(engine.stream)
        t2 = time.perf_counter()
        previous, pending = pending, launched
        if previous is not None:
            while not previous.done():
                time.sleep(0)
        t3 = time.perf_counter()
        if previous is not None:
            previous.outputs()
        t4 = time.perf_counter()
        if call >= 2:  # the first two calls start the turns
            note_phases(spent, t0, t1, t2, t3, t4)
            periods.append(t4 - t0)
            events.append((began, ended))
    torch.cuda.synchronize()
    spans = [b.elapsed_time(e) for b, e in events]
    gaps = [events[i][0].elapsed_time(events[i + 1][0]) for i in range(len(events) - 1)]
    gaps = [start_to_start - span for start_to_start, span in zip(gaps, spans)]
    row = {name: float(np.median(times) * 1e3) for name, times in spent.items()}
    row["period"] = float(np.median(periods) * 1e3)
    row["gpu_span"] = float(np.mean(spans))
    row["gpu_gap"] = float(np.mean(gaps))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    import torch

    from enginehouse.backends import host_copies

    model = MODELS[args.model]
    print(f"building {model.name} ...", flush=True)
    config, instance, seconds, hit, _ = build(model, PRECISION[model.kind], False)
    engine, other = instance(), instance()
    print(f"  built in {seconds:.1f} s (cache hit: {hit})", flush=True)
    outputs = [t.name for t in config.output]
    results: dict[int, dict[str, Any]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        host = model.inputs(batch)
        parts = {name: [array] for name, array in host.items()}
        engine.execute(host, outputs)  # fills the static buffers that replay() reads
        for _ in range(20):
            engine.replay(batch)
        torch.cuda.synchronize()
        iters = args.iters if batch < 64 else max(20, args.iters // 4)

        def replay(batch: int = batch) -> None:
            engine.replay(batch)
            torch.cuda.synchronize()

        def execute(host: dict[str, np.ndarray] = host) -> None:
            engine.execute(host, outputs)

        by_phase, polled = phases(engine, parts, outputs, iters)
        row: dict[str, Any] = {
            "replay_ms": p50_ms(replay, iters),
            "execute_ms": p50_ms(execute, iters),
            "phases_ms": by_phase,
            "polled_ms": polled,
        }
        for threads in THREADS:
            os.environ["ENGINEHOUSE_HOST_COPY_THREADS"] = threads
            host_copies._pool = None  # a pool of the new size
            row[f"execute_ms_{threads}_threads"] = p50_ms(execute, iters)
        os.environ.pop("ENGINEHOUSE_HOST_COPY_THREADS")
        host_copies._pool = None
        if batch > 1:
            other.execute(host, outputs)
            for gather in (True, False):
                turns = taking_turns(torch, [engine, other], parts, outputs, iters, gather)
                row["two_instances" if gather else "two_instances_staged"] = turns
        results[batch] = row
        print(
            f"  b{batch}: replay {row['replay_ms']:.3f} ms, host->host {row['execute_ms']:.3f} ms"
            f" (+{row['execute_ms'] - row['replay_ms']:.3f}); "
            + ", ".join(f"{name} {ms:.3f}" for name, ms in by_phase.items())
            + f"; polled {polled:.3f} ms; by copy threads "
            + ", ".join(f"{t}: {row[f'execute_ms_{t}_threads']:.3f}" for t in THREADS),
            flush=True,
        )
        for key, label in (("two_instances", "gathering"), ("two_instances_staged", "staged")):
            if key in row:
                turns = row[key]
                print(
                    f"  b{batch} 2 instances, {label}: period {turns['period']:.3f} ms "
                    f"({row['replay_ms'] / turns['period']:.2f}x replay); "
                    + ", ".join(
                        f"{name} {turns[name]:.3f}"
                        for name in ("gather", "launch", "wait", "outputs")
                    )
                    + f"; on the GPU a batch's graph {turns['gpu_span']:.3f} ms, "
                    f"{turns['gpu_gap']:+.3f} ms to the next",
                    flush=True,
                )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "host_phases.json").write_text(json.dumps(results, indent=1))
    print(
        "host_phases: "
        + "; ".join(
            f"b{b} host->host {r['execute_ms']:.3f} ms vs replay {r['replay_ms']:.3f} ms, "
            f"polled {r['polled_ms']:.3f} ms"
            for b, r in results.items()
        )
    )


if __name__ == "__main__":
    main()
