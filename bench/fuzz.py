"""Long fuzzing runs of the request decoders and the config override path, with RSS tracked.

The same strategies and property as tests/unit/test_fuzz.py (tests/fuzzing.py), run for
``--examples`` generated inputs per target: each must be decoded or refused with one of the
project's 4xx-class errors. Inputs are generated in chunks and then decoded, with
the process's RSS read around each decoding pass, so that what the decoders keep shows apart
from what hypothesis holds while generating; the last line says whether decoding left RSS
flat (growth under ``--rss-slack-mb`` over the whole run).

    python bench/fuzz.py [--examples 100000] [--targets http,grpc,config]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "src")]

from make_repository import SIMPLE_CONFIG, make_repository  # noqa: E402

from tests import fuzzing  # noqa: E402


def generate(strategy: Any, count: int) -> list[Any]:
    """``count`` inputs drawn by hypothesis (it shrinks nothing here: all pass to the list)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategy)
    def draw(value: Any) -> None:
        drawn.append(value)

    draw()
    return drawn


def run_target(
    name: str, strategy: Any, check: Callable[[Any], None], examples: int, chunk: int
) -> dict:
    """Generate in chunks, then decode each chunk with RSS read before and after: what the
    decoders keep shows apart from what hypothesis itself holds while generating."""
    process = psutil.Process()
    outcomes: collections.Counter[str] = collections.Counter()
    decode_growth = 0.0
    decode_seconds = 0.0
    done = 0
    started = time.perf_counter()
    first_after = 0.0
    while done < examples:
        inputs = generate(strategy, min(chunk, examples - done))
        before = process.memory_info().rss / 2**20
        decode_started = time.perf_counter()
        for value in inputs:
            try:
                check(value)
                outcomes["decoded"] += 1
            except BaseException as exc:
                if not fuzzing.client_error(exc):
                    raise AssertionError(f"{type(exc).__name__} escaped: {exc}") from exc
                outcomes[type(exc).__name__] += 1
        decode_seconds += time.perf_counter() - decode_started
        after = process.memory_info().rss / 2**20
        if first_after:  # the first pass pays for first-use imports and caches
            decode_growth += after - before
        first_after = first_after or after
        done += len(inputs)
        print(f"  {name}: {done}/{examples}, RSS {after:.1f} MB", flush=True)
    return {
        "name": name,
        "count": done,
        "seconds": time.perf_counter() - started,
        "decode_seconds": decode_seconds,
        "outcomes": outcomes,
        "decode_growth": decode_growth,
        "rss": (first_after, process.memory_info().rss / 2**20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--targets", default="http,grpc,config")
    parser.add_argument("--chunk", type=int, default=5000, help="inputs generated at a time")
    parser.add_argument("--rss-slack-mb", type=float, default=8.0)
    args = parser.parse_args()
    version = fuzzing.simple_version(SIMPLE_CONFIG.format(name="simple", max_batch=8))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        source = make_repository(Path(folder) / "source", with_torch=False)
        location = fuzzing.simple_location(
            Path(folder) / "repo", source / "simple" / "1" / "model.onnx"
        )
        targets = {
            "http": (
                fuzzing.http_bodies(),
                lambda body: fuzzing.decode_http(version, *body),
                args.examples,
            ),
            "grpc": (
                fuzzing.grpc_messages(),
                lambda wire: fuzzing.decode_grpc(version, wire),
                args.examples,
            ),
            "config": (
                fuzzing.config_overrides,
                lambda document: fuzzing.load_override(location, document),
                max(1, args.examples // 10),
            ),
        }
        for name in args.targets.split(","):
            strategy, check, examples = targets[name]
            results.append(run_target(name, strategy, check, examples, args.chunk))
    print()
    print(
        "| target | inputs | seconds (decoding) | decoded | refused (by error) | "
        "RSS growth while decoding (after the first chunk) MB | RSS after first chunk -> end MB |"
    )
    print("|---|---|---|---|---|---|---|")
    flat = True
    for result in results:
        outcomes = result["outcomes"]
        refused = ", ".join(f"{k} {v}" for k, v in outcomes.most_common() if k != "decoded")
        flat = flat and result["decode_growth"] < args.rss_slack_mb
        print(
            f"| {result['name']} | {result['count']} | {result['seconds']:.0f} "
            f"({result['decode_seconds']:.1f}) | {outcomes['decoded']} | {refused} | "
            f"{result['decode_growth']:+.1f} | {result['rss'][0]:.0f} -> {result['rss'][1]:.0f} |"
        )
    print()
    total = sum(r["count"] for r in results)
    print(
        f"{total} inputs, no exception escaped but the project's own 4xx errors; RSS "
        f"{'flat' if flat else 'GREW'} (slack {args.rss_slack_mb:.0f} MB)"
    )
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
