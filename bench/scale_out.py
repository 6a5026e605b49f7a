"""Scale-out on loopback: servers behind HAProxy through rolling restarts and a scale-out.

Three `enginehouse serve` processes behind a real HAProxy (health checks on
`/v2/health/ready`, per-request balancing of HTTP and gRPC) take steady closed-loop HTTP and
gRPC load; each is restarted in turn (drained from the balancer, SIGTERM, started, back once
ready) ``--rounds`` times, then a fourth server starts. The table gives the outcomes and
latencies per phase; the last line the failed requests and how soon the fourth took traffic.

    python bench/scale_out.py [--rounds 2] [--http-clients 4] [--grpc-clients 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "src")]

from make_repository import make_repository  # noqa: E402

from tests.deploy.fleet import Fleet, Load  # noqa: E402


def phase(
    load: Load, label: str, rows: list[tuple[str, int, int, float, float, float]], action
) -> None:  # type: ignore[no-untyped-def]
    before_ok = sum(v for k, v in load.outcomes.items() if k.endswith("ok"))
    before_failed = sum(v for k, v in load.outcomes.items() if k.endswith("failed"))
    first = len(load.latencies)
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    ok = sum(v for k, v in load.outcomes.items() if k.endswith("ok")) - before_ok
    failed = sum(v for k, v in load.outcomes.items() if k.endswith("failed")) - before_failed
    latencies = np.array(load.latencies[first:]) * 1000
    rows.append(
        (
            label,
            ok,
            failed,
            seconds,
            float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
            float(np.percentile(latencies, 99)) if len(latencies) else 0.0,
        )
    )
    print(f"  {label}: {ok} ok, {failed} failed in {seconds:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http-clients", type=int, default=4)
    parser.add_argument("--grpc-clients", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=5.0)
    args = parser.parse_args()
    rows: list[tuple[str, int, int, float, float, float]] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        repository = make_repository(folder / "repo", with_torch=False)
        print("starting 3 servers and HAProxy ...", flush=True)
        fleet = Fleet(repository, folder, slots=4, running=3)
        load = Load(fleet, args.http_clients, args.grpc_clients)
        joined_s = float("nan")
        try:
            load.start()
            phase(load, "steady, 3 servers", rows, lambda: time.sleep(args.steady_s))
            for round_index in range(args.rounds):
                for member in fleet.members[:3]:
                    phase(
                        load,
                        f"round {round_index + 1}: restart {member.name}",
                        rows,
                        lambda member=member: fleet.restart(member),
                    )
            fourth = fleet.members[3]

            def scale_out() -> None:
                nonlocal joined_s
                fleet.start(fourth)
                assert fourth.server is not None
                fourth.server.wait_ready()
                ready_at = time.monotonic()
                while fleet.served_by(fourth) == 0:
                    time.sleep(0.02)
                joined_s = time.monotonic() - ready_at

            phase(load, "start s4", rows, scale_out)
            phase(load, "steady, 4 servers", rows, lambda: time.sleep(args.steady_s))
            shares = {m.name: fleet.served_by(m) for m in fleet.members}
        finally:
            load.stop()
            fleet.stop()
    print()
    print("| phase | ok | failed | seconds | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for label, ok, failed, seconds, p50, p99 in rows:
        print(f"| {label} | {ok} | {failed} | {seconds:.1f} | {p50:.2f} | {p99:.2f} |")
    total_ok = sum(r[1] for r in rows)
    total_failed = sum(r[2] for r in rows)
    print()
    print(f"requests answered by each server: {shares}")
    print(
        f"{total_ok} requests ok, {total_failed} failed through {3 * args.rounds} restarts; "
        f"the fourth server took traffic {joined_s * 1000:.0f} ms after it turned ready"
    )
    if load.failures:
        print("first failures:", load.failures[:5])
    return 0 if total_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
