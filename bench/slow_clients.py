"""Slow clients: normal HTTP inference while hundreds of slowloris connections are open.

A second process opens ``--slow`` connections that each send one byte of a request's headers
every two seconds (and as many that connect and send nothing); meanwhile a normal client
sends `simple` inferences over a kept-alive connection. The table gives the normal client's
latency with and without the slow connections, and when the server closed them (the header
timeout for the first kind, the keep-alive timeout for the second).

    python bench/slow_clients.py [--slow 500] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

from make_repository import make_repository  # noqa: E402

from enginehouse.testing import ServerProcess  # noqa: E402

BODY = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
).encode()


async def _slowloris(port: int, count: int, seconds: float, result: dict) -> None:
    closed_at: list[float] = []
    idle_closed_at: list[float] = []
    started = time.perf_counter()

    async def trickle() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for byte in request:
            writer.write(bytes([byte]))
            try:
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1024), timeout=2.0)
            except TimeoutError:
                continue
            except OSError:
                break
            if data == b"" or data.startswith(b"HTTP/1.1 408"):
                break
        closed_at.append(time.perf_counter() - started)
        writer.close()

    async def silent() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.wait_for(reader.read(1024), timeout=seconds + 120)
        except (TimeoutError, OSError):
            pass
        idle_closed_at.append(time.perf_counter() - started)
        writer.close()

    tasks = [asyncio.create_task(trickle()) for _ in range(count)]
    tasks += [asyncio.create_task(silent()) for _ in range(count)]
    await asyncio.wait(tasks, timeout=seconds + 120)
    result["closed_at"] = closed_at
    result["idle_closed_at"] = idle_closed_at


def slowloris(port: int, count: int, seconds: float, queue: multiprocessing.Queue) -> None:
    result: dict = {}
    asyncio.run(_slowloris(port, count, seconds, result))
    queue.put(result)


def normal_client(port: int, seconds: float) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        connection.request("POST", "/v2/models/simple/infer", body=BODY)
        response = connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload
        latencies.append(time.perf_counter() - started)
    connection.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--keepalive", type=float, default=20.0)
    args = parser.parse_args()
    folder = ROOT / "bench" / "out" / "slow_clients"
    folder.mkdir(parents=True, exist_ok=True)
    repository = make_repository(folder / "repo", with_torch=False)
    with ServerProcess(
        [repository], "--http-keepalive-timeout-secs", str(args.keepalive)
    ) as server:
        server.wait_ready()
        print("normal client alone ...", flush=True)
        alone = normal_client(server.http_port, args.seconds / 3)
        print(f"normal client with {args.slow} + {args.slow} slow connections ...", flush=True)
        queue: multiprocessing.Queue = multiprocessing.Queue()
        slow = multiprocessing.Process(
            target=slowloris, args=(server.http_port, args.slow, args.seconds, queue)
        )
        slow.start()
        time.sleep(2.0)  # let them connect
        loaded = normal_client(server.http_port, args.seconds)
        result = queue.get(timeout=args.keepalive + 180)
        slow.join()
    rows = [("alone", alone), (f"{2 * args.slow} slow connections open", loaded)]
    print()
    print("| normal client | requests | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for label, latencies in rows:
        ms = np.array(latencies) * 1000
        print(
            f"| {label} | {len(ms)} | {np.percentile(ms, 50):.2f} | {np.percentile(ms, 99):.2f} "
            f"| {ms.max():.2f} |"
        )
    closed = np.array(result["closed_at"])
    idle = np.array(result["idle_closed_at"])
    print()
    print(
        f"trickling connections closed: {len(closed)}/{args.slow}, at "
        f"{closed.min():.1f}-{closed.max():.1f} s; silent ones: {len(idle)}/{args.slow}, at "
        f"{idle.min():.1f}-{idle.max():.1f} s"
    )
    ratio = np.percentile(loaded, 99) / np.percentile(alone, 99)
    print(
        f"p99 alone {np.percentile(alone, 99) * 1000:.2f} ms, with slow connections "
        f"{np.percentile(loaded, 99) * 1000:.2f} ms ({ratio:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
