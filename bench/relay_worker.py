"""A gRPC worker's own cost of relaying one unary call to the core, the core stood in for.

With ``--grpc-workers`` each call crosses the worker's relay client twice (the request out,
the answer back). This measures that part alone: the worker's ``RelayCalls`` (what its native
frontend calls) against a stand-in core in another process that answers every frame with
its own payload at once, so the client's CPU per call is the figure, without HTTP/2, the
core's work or a load generator on the same cores.

    python bench/relay_worker.py [--seconds 3] [--concurrency 32] [--bytes 600] [--rounds 3]

To compare two trees, run it with each on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from enginehouse.frontends.grpc import worker
from enginehouse.frontends.grpc.frames import Coalescer
from enginehouse.frontends.grpc.receive import FrameReceiver


class _EchoCore(FrameReceiver):
    """Answers each frame with status 0 and the frame's own payload."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._out = Coalescer(transport)  # type: ignore[arg-type]

    def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
        self._out.send(call, 0, payload)


def _serve_echo(path: str) -> None:
    import uvloop

    async def run() -> None:
        await asyncio.get_running_loop().create_unix_server(_EchoCore, path)
        await asyncio.Event().wait()

    uvloop.run(run())


async def _relay(path: str) -> worker.RelayClient:
    if hasattr(worker.RelayClient, "connect"):
        return await worker.RelayClient.connect(path)
    # Trees before 5f851b4 read the relay through a stream reader.
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 26)
    return worker.RelayClient(reader, writer)  # type: ignore[arg-type]


async def _calls(
    path: str, seconds: float, concurrency: int, size: int
) -> tuple[int, float, float]:
    """(calls answered, client CPU seconds, wall seconds) of a closed-loop run."""
    relay = await _relay(path)
    calls = worker.RelayCalls(relay)
    payload = b"x" * size
    answered = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal answered
        while time.perf_counter() < stop:
            await asyncio.ensure_future(calls.unary("ModelInfer", payload))
            answered += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return answered, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bytes", type=int, default=600, help="each request's (and answer's) size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    path = str(Path(tempfile.mkdtemp(prefix="relay-bench-")) / "core.sock")
    core = multiprocessing.Process(target=_serve_echo, args=(path,), daemon=True)
    core.start()
    try:
        while not os.path.exists(path):
            time.sleep(0.01)
        per_call, rates = [], []
        print(f"{'round':>5} {'calls/s':>9} {'worker CPU us/call':>19}")
        for round_ in range(args.rounds):
            answered, cpu, wall = uvloop.run(
                _calls(path, args.seconds, args.concurrency, args.bytes)
            )
            per_call.append(cpu / max(answered, 1) * 1e6)
            rates.append(answered / wall)
            print(f"{round_ + 1:5d} {rates[-1]:9.0f} {per_call[-1]:19.1f}", flush=True)
    finally:
        core.kill()
    print(
        f"relay_worker: {statistics.median(per_call):.1f} us of the worker's CPU per relayed "
        f"call (median of {args.rounds}), {statistics.median(rates):.0f} calls/s"
    )


if __name__ == "__main__":
    main()
