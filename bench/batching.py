"""Dynamic batching benchmark: a CPU MLP under 64 concurrent gRPC clients, batched vs not.

The model is a 3-layer MLP, 2048 wide (about 1-3 ms per request at batch 1 on one thread),
with one instance either way. The same load runs against the model with and without
``dynamic_batching``; the ratio of throughputs is the figure, and p99 is compared with
max_queue_delay + 2x the mean batch execution time (from the statistics API).

    python bench/batching.py [--seconds 10] [--clients 64] [--delay-us 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import grpc_load  # noqa: E402

from enginehouse.testing import ServerProcess  # noqa: E402

WIDTH = 2048


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "INPUT0"
    for i in range(3):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"]))
        current = f"r{i}" if i < 2 else "OUTPUT0"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [current]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def config(name: str, batching: str) -> str:
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 128\n'
        f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{WIDTH}] }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{WIDTH}] }}]\n'
        "instance_group [{ count: 1 kind: KIND_CPU }]\n"
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n' + batching
    )


def message(model: str) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, WIDTH])
    request.raw_input_contents.append(np.ones(WIDTH, np.float32).tobytes())
    return request.SerializeToString()


def stats(port: int, model: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats") as r:
        return json.loads(r.read())["model_stats"][0]  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--delay-us", type=int, default=2000)
    parser.add_argument("--grpc-workers", type=int, default=0, help="frontend processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        variants = {
            "mlp_plain": "",
            "mlp_batched": (
                f"dynamic_batching {{ max_queue_delay_microseconds: {args.delay_us} }}\n"
            ),
        }
        for name, batching in variants.items():
            (repo / name / "1").mkdir(parents=True)
            onnx.save(mlp(), str(repo / name / "1" / "model.onnx"))
            (repo / name / "config.pbtxt").write_text(config(name, batching))
        server = ServerProcess([repo], "--grpc-workers", str(args.grpc_workers))
        try:
            server.wait_ready()
            rows = {}
            for name in variants:
                before = stats(server.http_port, name)
                print(f"{name}: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
                result = grpc_load(server.grpc_url, message(name), args.clients, args.seconds)
                after = stats(server.http_port, name)
                executions = after["execution_count"] - before["execution_count"]
                infer_ns = (
                    after["inference_stats"]["compute_infer"]["ns"]
                    - before["inference_stats"]["compute_infer"]["ns"]
                )
                batch_ns = sum(b["compute_infer"]["ns"] for b in after["batch_stats"]) - sum(
                    b["compute_infer"]["ns"] for b in before["batch_stats"]
                )
                mean_exec_ms = batch_ns / max(1, executions) / 1e6
                inferences = after["inference_count"] - before["inference_count"]
                rows[name] = (result, executions, inferences, mean_exec_ms, infer_ns)
        finally:
            server.stop()

    print()
    print(
        f"{'model':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'executions':>11} {'mean batch':>11} {'exec ms':>8}"
    )
    for name, (result, executions, inferences, exec_ms, _) in rows.items():
        print(
            f"{name:<12} {result.rps:9.0f} {result.p50_ms:8.2f} {result.p99_ms:8.2f} "
            f"{result.errors:7d} {executions:11d} {inferences / max(1, executions):11.1f} "
            f"{exec_ms:8.2f}"
        )
    plain, batched = rows["mlp_plain"][0], rows["mlp_batched"][0]
    exec_ms = rows["mlp_batched"][3]
    bound = args.delay_us / 1000 + 2 * exec_ms
    print(
        f"batching: {batched.rps:.0f} req/s vs {plain.rps:.0f} without = "
        f"{batched.rps / plain.rps:.2f}x; p99 {batched.p99_ms:.2f} ms vs bound "
        f"{bound:.2f} ms (delay {args.delay_us / 1000:.1f} + 2 x {exec_ms:.2f} exec)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
