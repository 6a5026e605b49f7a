"""Frontend benchmark: requests/s and latency of the `simple` model, enginehouse vs MLServer.

Serves Triton's quick-start `simple` model (INT32 [16] add/sub) and drives it over HTTP JSON,
HTTP with the binary tensor extension, and gRPC, at 1, 8 and 32 connections: wrk for HTTP,
multi-process grpc.aio clients for gRPC (bench/loadgen.py). MLServer runs in the same run
with an equivalent custom runtime (NumPy add/sub, cheaper than our ONNX Runtime session),
from a virtual environment of its own (``--mlserver-venv``, made if missing), with
``parallel_workers: 0``: on this 2-core machine that is its fastest setting (its default,
one inference worker process, gave 617 req/s against 1,177 at 8 connections).

    python bench/frontend.py [--seconds 5] [--mlserver-venv .venv-mlserver]

Each cell also gives the server's CPU per request (its process and children, from /proc).

Prints a table and ends with one line of figures; the goal is HTTP JSON at 8
connections >= 3x MLServer's requests/s with a lower p99.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
from tritonclient.grpc import service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_use import CpuSnapshot  # noqa: E402
from loadgen import LoadResult, grpc_load, wrk  # noqa: E402
from make_repository import SIMPLE_CONFIG, simple_model  # noqa: E402

from enginehouse.testing import ServerProcess  # noqa: E402


def mlserver_runtime(name: str, predict: str) -> str:
    """The source of an MLServer custom runtime class ``name`` whose ``predict`` runs the
    statements in ``predict`` (``payload`` is the request; NumpyCodec is imported)."""
    body = "".join(f"        {line}\n" for line in predict.strip().splitlines())
    return f"""
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class {name}(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
{body}"""


MLSERVER_RUNTIME = mlserver_runtime(
    "SimpleModel",
    """
a = NumpyCodec.decode_input(payload.inputs[0])
b = NumpyCodec.decode_input(payload.inputs[1])
return InferenceResponse(
    model_name=self.name,
    id=payload.id,
    outputs=[
        NumpyCodec.encode_output("OUTPUT0", a + b),
        NumpyCodec.encode_output("OUTPUT1", a - b),
    ],
)
""",
)

A = list(range(16))
B = [1] * 16


def json_body() -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": A},
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": B},
            ]
        }
    ).encode()


def binary_body() -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
                for n in ("INPUT0", "INPUT1")
            ],
            "outputs": [
                {"name": n, "parameters": {"binary_data": True}} for n in ("OUTPUT0", "OUTPUT1")
            ],
        }
    ).encode()
    data = np.array(A, np.int32).tobytes() + np.array(B, np.int32).tobytes()
    return header + data, len(header)


def grpc_message() -> bytes:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
    request.raw_input_contents.append(np.array(A, np.int32).tobytes())
    request.raw_input_contents.append(np.array(B, np.int32).tobytes())
    return request.SerializeToString()


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def start_enginehouse(work: Path) -> tuple[subprocess.Popen, int, int]:
    repo = work / "repo"
    (repo / "simple" / "1").mkdir(parents=True)
    model = simple_model(batch=True)
    model.ir_version = 8
    onnx.save(model, str(repo / "simple" / "1" / "model.onnx"))
    (repo / "simple" / "config.pbtxt").write_text(SIMPLE_CONFIG.format(name="simple", max_batch=8))
    server = ServerProcess([repo])
    server.wait_ready()
    return server.process, server.http_port, server.grpc_port


def mlserver_binary(venv: Path) -> Path:
    binary = venv / "bin" / "mlserver"
    if not binary.exists():
        print(f"installing mlserver==1.7.1 into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # MLServer 1.7.1's worker processes fail with uvloop >= 0.22 (no current event loop).
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "mlserver==1.7.1", "uvloop<0.22"],
            check=True,
        )
    return binary


def serve_with_mlserver(
    models: Path, venv: Path, model: str, runtime: str, implementation: str, port: int
) -> subprocess.Popen:
    """MLServer serving one custom runtime (``runtime``: its module's source) as ``model``,
    HTTP on ``port``, gRPC on ``port + 1``, in the same process (``parallel_workers: 0``);
    returned once ready."""
    (models / model).mkdir(parents=True)
    module = implementation.split(".")[0]
    (models / f"{module}.py").write_text(runtime)
    (models / model / "model-settings.json").write_text(
        json.dumps({"name": model, "implementation": implementation})
    )
    (models / "settings.json").write_text(
        json.dumps(
            {
                "http_port": port,
                "grpc_port": port + 1,
                "metrics_port": port + 2,
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    process = subprocess.Popen(
        [str(mlserver_binary(venv)), "start", str(models)],
        cwd=models,
        env=dict(os.environ, PYTHONPATH=str(models)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(port, process)
    return process


def start_mlserver(work: Path, venv: Path) -> tuple[subprocess.Popen, int, int]:
    process = serve_with_mlserver(
        work / "mlserver", venv, "simple", MLSERVER_RUNTIME, "simple_runtime.SimpleModel", 18200
    )
    return process, 18200, 18201


def measure(
    http_port: int, grpc_port: int, seconds: float, connections: list[int], pid: int
) -> tuple[dict[str, LoadResult | None], dict[str, float]]:
    """Each load's result (None where it failed) and the server's CPU us per request."""
    url = f"http://127.0.0.1:{http_port}/v2/models/simple/infer"
    body, header_length = binary_body()
    results: dict[str, LoadResult | None] = {}
    cpu: dict[str, float] = {}
    for c in connections:
        for name, run in (
            (
                "http-json",
                lambda c=c: wrk(url, json_body(), {"Content-Type": "application/json"}, c, seconds),
            ),
            (
                "http-binary",
                lambda c=c: wrk(
                    url,
                    body,
                    {
                        "Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(header_length),
                    },
                    c,
                    seconds,
                ),
            ),
            ("grpc", lambda c=c: grpc_load(f"127.0.0.1:{grpc_port}", grpc_message(), c, seconds)),
        ):
            key = f"{name}@{c}"
            try:
                before = CpuSnapshot.take(pid)
                result = run()
                spent = CpuSnapshot.take(pid).seconds_since(before)
                results[key] = result if result.errors < result.requests else None
                cpu[key] = round(spent * 1e6 / max(result.requests, 1), 1)
            except Exception as exc:  # a peer without a feature gets n/a, not a crash
                print(f"  {key}: failed: {exc}", file=sys.stderr)
                results[key] = None
            used = f"  CPU {cpu[key]:.0f} us/req" if key in cpu else ""
            print(f"  {key}: {_cell(results[key])}{used}", flush=True)
    return results, cpu


def _cell(result: LoadResult | None) -> str:
    if result is None:
        return "n/a"
    errors = f" ({result.errors} errors)" if result.errors else ""
    return (
        f"{result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms{errors}"
    )


def plot(rows: dict[str, dict[str, LoadResult | None]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(rows)
    for i, (server, results) in enumerate(rows.items()):
        values = [(results[k].rps if results[k] else 0) for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, values, width, label=server)
    ax.set_xticks(np.arange(len(keys)) + width / 2, keys, rotation=30, ha="right")
    ax.set_ylabel("requests/s")
    ax.set_title("simple (INT32[16] add/sub), 2-core machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--mlserver-venv", type=Path, default=ROOT / ".venv-mlserver")
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()

    rows: dict[str, dict[str, LoadResult | None]] = {}
    cpu: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        starters = [("enginehouse", lambda: start_enginehouse(work))]
        if not args.no_mlserver:
            starters.append(("mlserver", lambda: start_mlserver(work, args.mlserver_venv)))
        for server, start in starters:
            print(f"{server}:", flush=True)
            process, http_port, grpc_port = start()
            try:
                rows[server], cpu[server] = measure(
                    http_port, grpc_port, args.seconds, args.connections, process.pid
                )
            finally:
                process.terminate()
                process.wait(60)

    keys = list(rows["enginehouse"])
    print()
    print(
        f"{'scenario':<16}"
        + "".join(f"{s:>48}" for s in rows)
        + ("   ratio" if len(rows) > 1 else "")
    )
    for key in keys:
        line = f"{key:<16}" + "".join(f"{_cell(rows[s][key]):>48}" for s in rows)
        if "mlserver" in rows:
            ours, peer = rows["enginehouse"][key], rows["mlserver"][key]
            line += f"   {ours.rps / peer.rps:5.2f}x" if ours and peer else "     n/a"
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"frontend-{stamp}.json").write_text(
        json.dumps(
            {
                s: {
                    k: (asdict(v) | {"rps": v.rps, "cpu_us": cpu[s].get(k)}) if v else None
                    for k, v in r.items()
                }
                for s, r in rows.items()
            },
            indent=2,
        )
    )
    plot(rows, args.out / f"frontend-{stamp}.png")
    c = 8 if 8 in args.connections else args.connections[-1]
    ours = rows["enginehouse"].get(f"http-json@{c}")
    summary = (
        f"frontend: http-json@{c} enginehouse {ours.rps:.0f} req/s p99 {ours.p99_ms:.2f} ms"
        if ours
        else "frontend: n/a"
    )
    peer = rows.get("mlserver", {}).get(f"http-json@{c}")
    if ours and peer:
        summary += (
            f"; mlserver {peer.rps:.0f} req/s p99 {peer.p99_ms:.2f} ms; "
            f"ratio {ours.rps / peer.rps:.2f}x"
        )
    grpc = rows["enginehouse"].get(f"grpc@{c}")
    if grpc:
        summary += f"; grpc@{c} {grpc.rps:.0f} req/s"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
