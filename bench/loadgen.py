"""Load generators for the benchmarks: wrk for HTTP, multi-process grpc.aio for gRPC.

Two kinds of gRPC load: closed-loop (``grpc_load``: N clients, each waits for its answer
before sending again, so the rate follows the latency) and open-loop (``grpc_open_load``:
requests leave on a fixed schedule whatever the answers do, and each latency counts from
the moment its request was due, so a stalled server shows in the percentiles instead of
slowing the load down).

wrk (Debian's package) is a C program that saturates an HTTP server from one thread. For
gRPC there is no such tool on PyPI or Debian, so each worker process sends pre-serialised
ModelInfer messages over grpc.aio with identity (de)serialisers: the client spends no time
in protobuf, and several processes share the concurrency.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Throughput and latency percentiles of one load run."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float = 0.0  # CPU the load processes used: near their count, they were the limit

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(f"cannot read wrk latency '{text}'")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    connections: int,
    seconds: float,
    expect: str | None = None,
) -> LoadResult:
    """POST ``body`` to ``url`` over ``connections`` keep-alive connections from one thread;
    with ``expect``, an answer whose body lacks that text counts as an error."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        lines = [
            'wrk.method = "POST"',
            f'local f = io.open("{body_path}", "rb")',
            "wrk.body = f:read('*a')",
            "f:close()",
        ]
        lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
        if expect is not None:
            lines += [
                f"expect = {json.dumps(expect)}",
                "local threads = {}",
                "function setup(thread) table.insert(threads, thread) end",
                "function init(args) wrong = 0 end",
                "function response(status, headers, body) "
                "if status ~= 200 or not string.find(body, expect, 1, true) then "
                "wrong = wrong + 1 end end",
                "function done(summary, latency, requests) local n = 0 "
                "for _, t in ipairs(threads) do n = n + t:get('wrong') end "
                "io.write('wrong answers: ' .. n .. '\\n') end",
            ]
        script = Path(tmp) / "post.lua"
        script.write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)(s|ms)", out).group(1))  # type: ignore[union-attr]
    duration = re.search(r"requests in ([\d.]+)(s|ms|m)", out)
    assert duration is not None
    secs = float(duration.group(1)) * {"s": 1.0, "ms": 1e-3, "m": 60.0}[duration.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    wrong = re.search(r"wrong answers: (\d+)", out)
    if expect is not None:
        assert wrong is not None, out
        errors = max(errors, int(wrong.group(1)))
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    # The latency distribution's own lines: a stdev percentage such as "72.99%" ends in
    # "99%" too.
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    assert p50 and p99, out
    return LoadResult(total, errors, secs, _ms(p50.group(1)), _ms(p99.group(1)))


_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _grpc_worker(
    target: str, message: bytes, concurrency: int, seconds: float, queue: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    import grpc

    async def run() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(_METHOD, request_serializer=None, response_deserializer=None)
            await call(message)
            deadline = time.perf_counter() + seconds

            async def loop() -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    try:
                        await call(message)
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return latencies, errors

    started = time.process_time()
    latencies, errors = asyncio.run(run())
    queue.put((latencies, errors, time.process_time() - started, seconds))


def _grpc_open_worker(
    target: str,
    message: bytes,
    rate: float,
    seconds: float,
    channels: int,
    queue: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    import grpc

    async def run() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        errors = 0
        opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        calls = [
            c.unary_unary(_METHOD, request_serializer=None, response_deserializer=None)
            for c in opened
        ]
        for call in calls:  # connected before the clock starts
            await call(message)

        async def one(call: object, due: float) -> None:
            nonlocal errors
            try:
                await call(message)  # type: ignore[operator]
            except grpc.aio.AioRpcError:
                errors += 1
                return
            latencies.append(time.perf_counter() - due)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(calls[i % channels], due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start  # past the schedule when the server fell behind
        for channel in opened:
            await channel.close()
        return latencies, errors, elapsed

    started = time.process_time()
    latencies, errors, elapsed = asyncio.run(run())
    queue.put((latencies, errors, time.process_time() - started, elapsed))


def grpc_open_load(
    target: str, message: bytes, rate: float, seconds: float, processes: int = 4, channels: int = 8
) -> LoadResult:
    """ModelInfer calls at ``rate`` a second in all, spread over ``processes`` processes of
    ``channels`` connections each. The kernel hands each connection to one of the server's
    gRPC workers by a hash, so few connections load some workers twice as much as others
    (32 over 6 workers: the busiest at 0.9 of a core while the mean was 0.5)."""
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    workers = [
        multiprocessing.Process(
            target=_grpc_open_worker,
            args=(target, message, rate / processes, seconds, channels, queue),
        )
        for _ in range(processes)
    ]
    return _collect(workers, queue, seconds)


def grpc_load(
    target: str, message: bytes, connections: int, seconds: float, processes: int = 2
) -> LoadResult:
    """Closed-loop ModelInfer calls: ``connections`` in flight over up to ``processes``."""
    processes = max(1, min(processes, connections))
    per = [
        connections // processes + (1 if i < connections % processes else 0)
        for i in range(processes)
    ]
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    workers = [
        multiprocessing.Process(target=_grpc_worker, args=(target, message, n, seconds, queue))
        for n in per
    ]
    return _collect(workers, queue, seconds)


def _collect(
    workers: list[multiprocessing.Process],
    queue: multiprocessing.Queue,  # type: ignore[type-arg]
    seconds: float,
) -> LoadResult:
    """Start the load processes and merge what they measured."""
    for worker in workers:
        worker.start()
    latencies: list[float] = []
    errors = 0
    cpu = 0.0
    for _ in workers:
        part, err, used, elapsed = queue.get(timeout=seconds + 120)
        latencies.extend(part)
        errors += err
        cpu += used
        seconds = max(seconds, elapsed)
    for worker in workers:
        worker.join()
    values = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return LoadResult(
        len(latencies),
        errors,
        seconds,
        float(np.percentile(values, 50)),
        float(np.percentile(values, 99)),
        cpu,
    )
