"""Zero-downtime rollouts: latency and failures while a model rolls between versions.

A model whose version v multiplies by v serves 32 client threads (half gRPC, half HTTP)
sending unversioned requests. After ``--rest`` seconds at rest, it is rolled v1 -> v2 -> v3
-> v2 -> v1 ... ``--rollouts`` times, once by rewriting config.pbtxt under
``--model-control-mode poll`` and once by repository-API loads with a config override.
Each version's warm-up runs ``--warmup`` batches of 64, so every rollout loads and warms a
version while the old one serves. Reported: requests, failed requests, answers from a
version that was not serving, p99 at rest and during rollouts (goal: ratio <= 2x), and a
plot of every request's latency over time with the rollouts marked.

    python bench/rollouts.py [--rollouts 10] [--threads 32] [--warmup 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.rollout import SoakResult, soak  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def plot(results: list[SoakResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for axis, result in zip(axes[:, 0], results):
        origin = result.samples[0].sent
        axis.scatter(
            [s.sent - origin for s in result.samples],
            [(s.done - s.sent) * 1000 for s in result.samples],
            s=2,
            alpha=0.4,
        )
        for step in result.steps[1:]:
            axis.axvspan(step.started - origin, step.ready - origin, color="orange", alpha=0.3)
        axis.set_yscale("log")
        axis.set_ylabel("latency (ms)")
        axis.set_title(
            f"{result.mode}: {result.rollouts} rollouts (orange: loading and warming), "
            f"p99 {result.p99_rest_ms:.0f} ms at rest, {result.p99_rollout_ms:.0f} ms rolling"
        )
    axes[-1, 0].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=10, help="per mode")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--rest", type=float, default=5.0)
    args = parser.parse_args()

    results: list[SoakResult] = []
    with tempfile.TemporaryDirectory() as workdir:
        for mode in ("poll", "api"):
            print(f"{mode}: {args.rollouts} rollouts under {args.threads} client threads")
            results.append(
                soak(
                    Path(workdir),
                    mode,
                    args.rollouts,
                    args.threads,
                    args.warmup,
                    args.rest,
                    log=True,
                )
            )

    print()
    print(
        f"{'mode':6} {'rollouts':>8} {'requests':>9} {'problems':>8} {'rollout s':>10} "
        f"{'p99 rest':>9} {'p99 roll':>9} {'ratio':>6}"
    )
    for r in results:
        print(
            f"{r.mode:6} {r.rollouts:8d} {r.requests:9d} {len(r.problems):8d} "
            f"{sum(r.rollout_s) / len(r.rollout_s):10.2f} {r.p99_rest_ms:8.1f}ms "
            f"{r.p99_rollout_ms:8.1f}ms {r.p99_ratio:5.2f}x"
        )
    for r in results:
        for problem in r.problems[:5]:
            print(f"  {r.mode}: {problem}")
    OUT.mkdir(exist_ok=True)
    plot(results, OUT / "rollouts.png")
    summary = {
        r.mode: {
            "rollouts": r.rollouts,
            "requests": r.requests,
            "problems": len(r.problems),
            "p99_rest_ms": round(r.p99_rest_ms, 2),
            "p99_rollout_ms": round(r.p99_rollout_ms, 2),
            "ratio": round(r.p99_ratio, 3),
            "rollout_s_mean": round(sum(r.rollout_s) / len(r.rollout_s), 3),
        }
        for r in results
    }
    (OUT / "rollouts.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"plot: {OUT / 'rollouts.png'}")
    print(
        "rollouts: "
        + ", ".join(
            f"{r.mode} {len(r.problems)} problems in {r.requests} requests, "
            f"p99 {r.p99_rollout_ms:.1f}/{r.p99_rest_ms:.1f} ms = {r.p99_ratio:.2f}x"
            for r in results
        )
    )


if __name__ == "__main__":
    main()
