"""A 1 MB FP32 tensor in and out, enginehouse against MLServer, with and without shared memory.

Both servers serve an identity model of 262,144 floats (enginehouse: an ONNX Identity in ONNX
Runtime; MLServer 1.7.1: a NumPy runtime returning its input, from its own virtual
environment, as bench/frontend.py makes it). The loads, at ``--connections`` each:

- HTTP with the tensor as binary data (enginehouse: Triton's binary tensor extension, wrk);
  MLServer has no binary extension, so it gets the same tensor as HTTP JSON;
- gRPC with the tensor in ``raw_input_contents`` (pre-serialised, bench/loadgen.py);
- enginehouse only (MLServer has no shared memory): the input in a system shared-memory region
  and the output written into one, over HTTP (a small JSON body) and gRPC.

For each: requests/s, p50, p99 and the server's CPU per request (its process and children,
from /proc, over the requests the load generator counted); every load starts with one answer
checked. Prints a table and ends with one line of figures; writes JSON and a plot under
``--out``.

With ``--grpc-workers N`` enginehouse's gRPC is served by N worker processes instead, twice:
with each worker's shared-memory rings to and from the core (the default) and with every
message over the relay socket (``--grpc-relay-ring-mb 0``); those rows add the core's own CPU
per request (its threads, without the workers).

``--inline-execution always`` (or ``never``) sets the model's ``inline_execution``
parameter; by default the server decides (``auto``).

    python bench/large_tensors.py [--seconds 4] [--connections 8] [--no-mlserver]
                                  [--grpc-workers 2] [--inline-execution auto]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from cpu_use import CpuSnapshot, cpu_report  # noqa: E402
from frontend import mlserver_runtime, serve_with_mlserver  # noqa: E402
from loadgen import LoadResult, grpc_load, wrk  # noqa: E402
from vs_triton import identity_model  # noqa: E402

from enginehouse.testing import ServerProcess  # noqa: E402

SIZE = 256 * 1024  # floats: 1 MiB
MODEL = "identity_1m"
CONFIG = f"""name: "{MODEL}"
backend: "onnxruntime"
max_batch_size: 8
input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{SIZE}] }}]
output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{SIZE}] }}]
instance_group [{{ count: 1 kind: KIND_CPU }}]
"""
MLSERVER_RUNTIME = mlserver_runtime(
    "Identity",
    """
data = NumpyCodec.decode_input(payload.inputs[0])
return InferenceResponse(
    model_name=self.name, outputs=[NumpyCodec.encode_output("OUTPUT0", data.copy())]
)
""",
)
DATA = np.random.default_rng(0).standard_normal((1, SIZE)).astype(np.float32)


def binary_body(outputs_binary: bool = True) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [1, SIZE],
                    "parameters": {"binary_data_size": DATA.nbytes},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": outputs_binary}}],
        }
    ).encode()
    return header + DATA.tobytes(), len(header)


def json_body() -> bytes:
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1, SIZE], "data": DATA[0].tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def shm_json_body() -> bytes:
    region = {"shared_memory_region": "in", "shared_memory_byte_size": DATA.nbytes}
    out = {"shared_memory_region": "out", "shared_memory_byte_size": DATA.nbytes}
    return json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, SIZE], "parameters": region}
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": out}],
        }
    ).encode()


def grpc_message(shared_memory: bool = False) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, SIZE])
    if shared_memory:
        tensor.parameters["shared_memory_region"].string_param = "in"
        tensor.parameters["shared_memory_byte_size"].int64_param = DATA.nbytes
        output = request.outputs.add(name="OUTPUT0")
        output.parameters["shared_memory_region"].string_param = "out"
        output.parameters["shared_memory_byte_size"].int64_param = DATA.nbytes
    else:
        request.raw_input_contents.append(DATA.tobytes())
    return request.SerializeToString()


class Regions:
    """The input region (holding DATA) and the output region every shared-memory load uses."""

    def __init__(self, http_port: int) -> None:
        import tritonclient.http as httpclient
        import tritonclient.utils.shared_memory as shm

        self.shm = shm
        self.client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        self.handles = []
        for name in ("in", "out"):
            key = f"/bench_large_{name}_{os.getpid()}"
            handle = shm.create_shared_memory_region(name, key, DATA.nbytes)
            self.handles.append(handle)
            self.client.register_system_shared_memory(name, key, DATA.nbytes)
        shm.set_shared_memory_region(self.handles[0], [DATA])

    def check(self) -> None:
        """One request through the regions over HTTP, its answer read back."""
        import tritonclient.http as httpclient

        self.shm.set_shared_memory_region(self.handles[1], [np.zeros_like(DATA)])
        item = httpclient.InferInput("INPUT0", [1, SIZE], "FP32")
        item.set_shared_memory("in", DATA.nbytes)
        out = httpclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("out", DATA.nbytes)
        self.client.infer(MODEL, [item], outputs=[out])
        got = self.shm.get_contents_as_numpy(self.handles[1], np.float32, [1, SIZE])
        if not np.array_equal(got, DATA):
            raise AssertionError("wrong answer through shared memory")

    def close(self) -> None:
        self.client.unregister_system_shared_memory()
        for handle in self.handles:
            self.shm.destroy_shared_memory_region(handle)


def check_answer(url: str, body: bytes, headers: dict[str, str], binary: bool) -> None:
    """One request of a load, its answer compared with the input."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        content = response.read()
        if binary:
            header_length = int(response.headers["Inference-Header-Content-Length"])
            got = np.frombuffer(content[header_length:], np.float32)
        else:
            got = np.asarray(json.loads(content)["outputs"][0]["data"], np.float32)
    if not np.array_equal(got, DATA[0]):
        raise AssertionError(f"wrong answer from {url}")


def check_grpc(port: int) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    item = grpcclient.InferInput("INPUT0", [1, SIZE], "FP32")
    item.set_data_from_numpy(DATA)
    got = client.infer(MODEL, [item]).as_numpy("OUTPUT0")
    if got is None or not np.array_equal(got.reshape(-1), DATA[0]):
        raise AssertionError("wrong answer over gRPC")


def measured(pid: int, run: Callable[[], LoadResult]) -> dict[str, Any]:
    before = CpuSnapshot.take(pid)
    result = run()
    after = CpuSnapshot.take(pid)
    cpu_s = after.seconds_since(before)
    split = cpu_report(before, after, 1.0, result.requests)
    return {
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 2),
        "p99_ms": round(result.p99_ms, 2),
        "cpu_us": round(cpu_s * 1e6 / max(result.requests, 1), 1),
        "core_us": split["core_us_per_req"],
        "errors": result.errors,
    }


def worker_loads(
    work: Path, connections: int, seconds: float, workers: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """1 MB over gRPC through ``workers`` worker processes, with their rings and without,
    alternating, ``rounds`` times each; the best round of each is kept."""
    repo = work / "repo"
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for label, ring_mb in (("gRPC workers, rings", "16"), ("gRPC workers, socket", "0")):
            server = ServerProcess(
                [repo],
                "--grpc-workers",
                str(workers),
                "--grpc-relay-ring-mb",
                ring_mb,
                log_path=work / f"workers-{ring_mb}.log",
            )
            try:
                server.wait_ready()
                check_grpc(server.grpc_port)
                grpc = f"127.0.0.1:{server.grpc_port}"
                runs.setdefault(label, []).append(
                    measured(
                        server.process.pid,
                        lambda grpc=grpc: grpc_load(grpc, grpc_message(), connections, seconds),
                    )
                )
                print(f"  {label}: {runs[label][-1]}", flush=True)
            finally:
                server.stop()
    return {label: max(results, key=lambda r: r["rps"]) for label, results in runs.items()}


def enginehouse_loads(
    work: Path, connections: int, seconds: float, inline: str = "auto"
) -> dict[str, dict[str, Any]]:
    repo = work / "repo"
    (repo / MODEL / "1").mkdir(parents=True)
    onnx.save(identity_model(SIZE), str(repo / MODEL / "1" / "model.onnx"))
    parameter = f'parameters {{ key: "inline_execution" value: {{ string_value: "{inline}" }} }}\n'
    (repo / MODEL / "config.pbtxt").write_text(CONFIG + parameter)
    server = ServerProcess([repo], log_path=work / "enginehouse.log")
    rows: dict[str, dict[str, Any]] = {}
    try:
        server.wait_ready()
        pid = server.process.pid
        url = f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer"
        grpc = f"127.0.0.1:{server.grpc_port}"
        body, header_length = binary_body()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
        check_answer(url, body, headers, binary=True)
        check_grpc(server.grpc_port)
        rows["HTTP binary"] = measured(pid, lambda: wrk(url, body, headers, connections, seconds))
        rows["gRPC"] = measured(pid, lambda: grpc_load(grpc, grpc_message(), connections, seconds))
        regions = Regions(server.http_port)
        try:
            regions.check()
            shm_body = shm_json_body()
            json_headers = {"Content-Type": "application/json"}
            rows["HTTP, shared memory"] = measured(
                pid, lambda: wrk(url, shm_body, json_headers, connections, seconds)
            )
            rows["gRPC, shared memory"] = measured(
                pid, lambda: grpc_load(grpc, grpc_message(True), connections, seconds)
            )
        finally:
            regions.close()
    finally:
        server.stop()
    return rows


def mlserver_loads(
    work: Path, venv: Path, connections: int, seconds: float
) -> dict[str, dict[str, Any]]:
    process = serve_with_mlserver(
        work / "mlserver", venv, MODEL, MLSERVER_RUNTIME, "identity_runtime.Identity", 18210
    )
    rows: dict[str, dict[str, Any]] = {}
    try:
        url = f"http://127.0.0.1:18210/v2/models/{MODEL}/infer"
        body = json_body()
        headers = {"Content-Type": "application/json"}
        check_answer(url, body, headers, binary=False)
        check_grpc(18211)
        rows["HTTP binary"] = measured(
            process.pid, lambda: wrk(url, body, headers, connections, seconds)
        )
        rows["gRPC"] = measured(
            process.pid, lambda: grpc_load("127.0.0.1:18211", grpc_message(), connections, seconds)
        )
    finally:
        process.terminate()
        process.wait(30)
    return rows


def plot(rows: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    loads = list(rows["enginehouse"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(rows)
    for i, (server, results) in enumerate(rows.items()):
        values = [results[load]["rps"] if load in results else 0 for load in loads]
        ax.bar(np.arange(len(loads)) + i * width, values, width, label=server)
    labels = [
        "HTTP binary\n(MLServer: JSON)" if load == "HTTP binary" and "mlserver" in rows else load
        for load in loads
    ]
    ax.set_xticks(np.arange(len(loads)) + width / 2, labels)
    ax.set_ylabel("requests/s")
    ax.set_title("1 MB FP32 in and out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--mlserver-venv", type=Path, default=ROOT / ".venv-mlserver")
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--grpc-workers", type=int, default=0, help="also serve gRPC from this many workers"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of those")
    parser.add_argument("--inline-execution", choices=("auto", "always", "never"), default="auto")
    args = parser.parse_args()
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("enginehouse ...", flush=True)
        rows["enginehouse"] = enginehouse_loads(
            work, args.connections, args.seconds, args.inline_execution
        )
        if args.grpc_workers:
            print(f"enginehouse, {args.grpc_workers} gRPC workers ...", flush=True)
            rows["enginehouse"] |= worker_loads(
                work, args.connections, args.seconds, args.grpc_workers, args.rounds
            )
        if not args.no_mlserver:
            print("mlserver ...", flush=True)
            rows["mlserver"] = mlserver_loads(
                work, args.mlserver_venv, args.connections, args.seconds
            )
    print(
        f"\n{'load':22} {'server':12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us':>7} "
        f"{'core us':>8}"
    )
    for server, results in rows.items():
        for load, r in results.items():
            shown = "HTTP JSON" if server == "mlserver" and load == "HTTP binary" else load
            print(
                f"{shown:22} {server:12} {r['rps']:8.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
                f"{r['cpu_us']:7.0f} {r['core_us']:8.0f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large_tensors.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "large_tensors.png")
    ours = rows["enginehouse"]
    figures = [f"{load} {r['rps']:.0f}/s {r['cpu_us']:.0f} us" for load, r in ours.items()]
    if "mlserver" in rows:
        for load in ("HTTP binary", "gRPC"):
            theirs = rows["mlserver"][load]["rps"]
            figures.append(f"{load} {ours[load]['rps'] / max(theirs, 1e-9):.1f}x MLServer")
        shared = ours["HTTP, shared memory"]["rps"] / max(
            rows["mlserver"]["HTTP binary"]["rps"], 1e-9
        )
        figures.append(f"HTTP with shared memory {shared:.1f}x MLServer's HTTP")
    if "gRPC workers, rings" in ours:
        ring, socket = ours["gRPC workers, rings"], ours["gRPC workers, socket"]
        figures.append(
            f"gRPC workers: the core's CPU {socket['core_us']:.0f} -> {ring['core_us']:.0f} us "
            f"per request with the rings ({ring['rps'] / max(socket['rps'], 1e-9):.2f}x req/s)"
        )
    print("large_tensors: " + "; ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
