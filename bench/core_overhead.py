"""The core's CPU per request on the gRPC workers' path, measured in one process.

With ``--grpc-workers`` the gRPC frontends run in their own processes and the core process
does the rest for every request: cut the relayed frame, parse the message, check it, queue
it, batch it, run it, split the batch and encode each response. That per-request cost
bounds how many requests a second one server can take whatever the GPU does, so it is
measured here apart from sockets and clients: relay frames are fed to the core's own relay
protocol as a socket would deliver them (one copy into the buffer the protocol offers), and
every response frame written back triggers that client's next request (closed loop).

Two request shapes: BERT-like (three INT64 [128] inputs, 3 KB out) and image-like (one FP32
[3, 224, 224] input, 588 KB). The models are trivial ONNX graphs, so engine time is small;
what is left is the core's own work.

    python bench/core_overhead.py [--requests 40000] [--clients 16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import uvloop
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb

from enginehouse.core.server import ServerCore
from enginehouse.frontends.grpc.frames import HEADER, METHODS
from enginehouse.frontends.grpc.relay import GrpcWorkers, _RelayProtocol
from enginehouse.repository.repository import ModelRepository

INFER = METHODS.index("ModelInfer")
READ_BYTES = 256 * 1024  # what one socket read delivers at most


@dataclass(frozen=True)
class Shape:
    name: str
    inputs: list[tuple[str, int, str, list[int], np.dtype]]  # name, onnx type, wire, dims
    output_dims: list[int]
    requests_scale: float  # fewer requests for the large shape


BERT = Shape(
    "bert-like",
    [(n, TensorProto.INT64, "INT64", [128], np.dtype(np.int64)) for n in ("ids", "mask", "types")],
    [768],
    1.0,
)
IMAGE = Shape(
    "image-like",
    [("image", TensorProto.FLOAT, "FP32", [3, 224, 224], np.dtype(np.float32))],
    [1000],
    0.15,
)


def model(shape: Shape) -> onnx.ModelProto:
    """Sum of the first input, broadcast to the output: cheap, but reads every input."""
    first, elem = shape.inputs[0][0], shape.inputs[0][1]
    nodes = [
        helper.make_node("Cast", [first], ["f"], to=TensorProto.FLOAT)
        if elem != TensorProto.FLOAT
        else helper.make_node("Identity", [first], ["f"]),
        helper.make_node("ReduceSum", ["f", "axes"], ["s"], keepdims=0),
        helper.make_node("Unsqueeze", ["s", "one"], ["column"]),
        helper.make_node("Expand", ["column", "shape"], ["out"]),
    ]
    axes = list(range(1, 1 + len(shape.inputs[0][3])))
    graph = helper.make_graph(
        nodes,
        "overhead",
        [
            helper.make_tensor_value_info(name, kind, ["batch", *dims])
            for name, kind, _, dims, _ in shape.inputs
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", *shape.output_dims])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
            helper.make_tensor("shape", TensorProto.INT64, [2], [1, *shape.output_dims]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def write_model(root: Path, shape: Shape) -> None:
    folder = root / "m"
    (folder / "1").mkdir(parents=True)
    onnx.save(model(shape), str(folder / "1" / "model.onnx"))
    config = "".join(
        f'input {{ name: "{n}" data_type: TYPE_{w} dims: {dims} }}\n'
        for n, _, w, dims, _ in shape.inputs
    )
    (folder / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 64\n'
        + config
        + f'output {{ name: "out" data_type: TYPE_FP32 dims: {shape.output_dims} }}\n'
        + "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
    )


def request(shape: Shape) -> bytes:
    message = pb.ModelInferRequest(model_name="m")
    rng = np.random.default_rng(0)
    for name, _, wire, dims, dtype in shape.inputs:
        message.inputs.add(name=name, datatype=wire, shape=[1, *dims])
        message.raw_input_contents.append((rng.random(dims) * 100).astype(dtype).tobytes())
    return message.SerializeToString()


def deliver(protocol: _RelayProtocol, data: bytes) -> None:
    """What socket reads do: copy into the buffer the protocol offers, a read at a time
    (or hand the bytes over, to a streaming protocol of an older version)."""
    if hasattr(protocol, "data_received"):
        protocol.data_received(data)
        return
    view = memoryview(data)
    position = 0
    while position < len(view):
        buffer = protocol.get_buffer(-1)
        count = min(len(buffer), len(view) - position, READ_BYTES)
        buffer[:count] = view[position : position + count]
        position += count
        protocol.buffer_updated(count)


class ClosedLoop:
    """The relay's transport: each response frame sends that client's next request."""

    def __init__(self, protocol: _RelayProtocol, payload: bytes, total: int) -> None:
        self.protocol = protocol
        self.payload = payload
        self.total = total
        self.answered = 0
        self.sent = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def is_closing(self) -> bool:
        return False

    def send(self, calls: list[int]) -> None:
        calls = calls[: max(0, self.total - self.sent)]
        self.sent += len(calls)
        frames = []
        for call in calls:
            frames.append(HEADER.pack(5 + len(self.payload), call, INFER))
            frames.append(self.payload)
        if len(self.payload) < READ_BYTES:  # many small frames arrive in one read
            deliver(self.protocol, b"".join(frames))
        else:  # a large frame takes reads of its own
            for frame in frames:
                deliver(self.protocol, frame)

    def writelines(self, parts: list[bytes]) -> None:
        calls = []
        for i in range(0, len(parts), 2):
            _, call, status = HEADER.unpack(parts[i])
            if status:
                raise SystemExit(f"request failed: {bytes(parts[i + 1])[:300]!r}")
            calls.append(call)
        self.answered += len(calls)
        if self.answered >= self.total:
            if not self.finished.done():
                self.finished.set_result(None)
            return
        asyncio.get_running_loop().call_soon(self.send, calls)


async def measure(shape: Shape, clients: int, requests: int) -> tuple[float, float, float]:
    """(requests/s, core CPU us per request, mean batch) for ``clients`` in a closed loop."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_model(root, shape)
        core = ServerCore(ModelRepository([root]))
        await core.start()
        relay = GrpcWorkers(core, "127.0.0.1", 1, 1 << 28, 1)
        payload = request(shape)
        try:
            for count in (max(clients * 4, requests // 5), requests):
                protocol = _RelayProtocol(relay)
                loop = ClosedLoop(protocol, payload, count)
                protocol.connection_made(loop)  # type: ignore[arg-type]
                before = core.model_statistics("m")[0]
                executions, served = before.execution_count, before.success.count
                started, cpu = time.perf_counter(), time.process_time()
                loop.send(list(range(clients)))
                await loop.finished
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                await asyncio.sleep(0.05)  # let the batches still running finish
            after = core.model_statistics("m")[0]
            batches = after.execution_count - executions
            mean_batch = (after.success.count - served) / max(1, batches)
        finally:
            await core.stop()
    return loop.answered / wall, cpu / loop.answered * 1e6, mean_batch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--shapes", default="bert-like,image-like")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for shape in [s for s in (BERT, IMAGE) if s.name in args.shapes.split(",")]:
        for count in clients:
            total = max(count * 8, int(args.requests * shape.requests_scale))
            print(f"{shape.name}: {count} clients, {total} requests ...", flush=True)
            rate, cpu_us, batch = uvloop.run(measure(shape, count, total))
            rows.append((shape.name, count, rate, cpu_us, batch))
    print()
    print(f"{'request':<11} {'clients':>7} {'req/s':>9} {'core us/req':>12} {'mean batch':>11}")
    for name, count, rate, cpu_us, batch in rows:
        print(f"{name:<11} {count:>7} {rate:9.0f} {cpu_us:12.1f} {batch:11.1f}")
    summary = ", ".join(f"{n} x{c}: {u:.1f} us/request" for n, c, _, u, _ in rows)
    print(f"core_overhead: core CPU per request on the relay path: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
