"""Overload: bursts of gRPC calls far beyond what one instance can serve at once.

A CPU model of about 1 ms per request with one instance takes bursts of N concurrent gRPC
calls (grpc.aio, over several connections). Every call must end OK or with a fast, explicit
UNAVAILABLE; none CANCELLED (grpc-core used to cancel calls that it held before the server
took them), none lost, and the server's memory must not grow with the burst. Runs once with
the default per-model pending limit and once with a tight one, and prints each status's
count and latencies.

    python bench/overload.py [--burst 3000] [--connections 4] [--tight 256]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from enginehouse.testing import ServerProcess  # noqa: E402

WIDTH = 768
LAYERS = 6


def slow_model() -> onnx.ModelProto:
    """A few MatMuls: about a millisecond per request on one thread."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    current = "INPUT0"
    for i in range(LAYERS):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"W{i}"))
        out = "OUTPUT0" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [1, WIDTH])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_repository(root: Path) -> Path:
    folder = root / "slow"
    (folder / "1").mkdir(parents=True)
    onnx.save(slow_model(), str(folder / "1" / "model.onnx"))
    (folder / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 0\n'
        f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [1, {WIDTH}] }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [1, {WIDTH}] }}]\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    )
    return root


async def burst(url: str, count: int, connections: int) -> list[tuple[str, float]]:
    """(status, seconds) of each of ``count`` calls sent at once over ``connections``."""
    message = pb.ModelInferRequest(model_name="slow")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, WIDTH])
    message.raw_input_contents.append(np.ones(WIDTH, np.float32).tobytes())
    channels = [grpc.aio.insecure_channel(url) for _ in range(connections)]
    stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    for stub in stubs:
        await stub.ModelInfer(message)

    async def one(index: int) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            reply = await stubs[index % connections].ModelInfer(message, timeout=120)
            status = "OK" if len(reply.raw_output_contents[0]) == WIDTH * 4 else "WRONG"
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        return status, time.perf_counter() - started

    results = await asyncio.gather(*(one(i) for i in range(count)))
    for channel in channels:
        await channel.close()
    return list(results)


def run(repository: Path, label: str, extra: list[str], args: argparse.Namespace) -> dict:
    with ServerProcess([repository], *extra) as server:
        server.wait_ready()
        process = psutil.Process(server.process.pid)
        rss_before = process.memory_info().rss
        rows = []
        for round_index in range(args.rounds):
            print(
                f"  {label}: burst {round_index + 1}/{args.rounds} of {args.burst} calls",
                flush=True,
            )
            started = time.perf_counter()
            results = asyncio.run(burst(server.grpc_url, args.burst, args.connections))
            rows.append((results, time.perf_counter() - started))
        rss_after = process.memory_info().rss
    statuses: dict[str, list[float]] = collections.defaultdict(list)
    for results, _ in rows:
        for status, seconds in results:
            statuses[status].append(seconds)
    return {
        "label": label,
        "statuses": statuses,
        "wall": float(np.median([wall for _, wall in rows])),
        "rss_growth_mb": (rss_after - rss_before) / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tight", type=int, default=256, help="the tight pending limit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repository = write_repository(Path(folder) / "repo")
        runs = [
            run(repository, "default limit (2048)", [], args),
            run(
                repository,
                f"limit {args.tight}",
                ["--model-max-pending-requests", str(args.tight)],
                args,
            ),
        ]
    print()
    print("| limit | status | calls | p50 ms | p99 ms | max ms | burst wall s | RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for result in runs:
        for status, times in sorted(result["statuses"].items()):
            ms = np.array(times) * 1000
            print(
                f"| {result['label']} | {status} | {len(times)} | {np.percentile(ms, 50):.1f} | "
                f"{np.percentile(ms, 99):.1f} | {ms.max():.1f} | {result['wall']:.2f} | "
                f"{result['rss_growth_mb']:.1f} |"
            )
        total = sum(len(t) for t in result["statuses"].values())
        ok = len(result["statuses"].get("OK", []))
        unavailable = result["statuses"].get("UNAVAILABLE", [])
        other = total - ok - len(unavailable)
        fast = f"{np.percentile(np.array(unavailable) * 1000, 99):.1f} ms" if unavailable else "-"
        summary.append(
            f"{result['label']}: {ok} OK, {len(unavailable)} UNAVAILABLE (p99 {fast}), "
            f"{other} other"
        )
    print()
    print("; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
