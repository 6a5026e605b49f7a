"""enginehouse against a real NVIDIA tritonserver: one repository, the same loads, one machine.

Both servers serve one model repository of ONNX models (one CPU instance each, so that like
is compared with like) through their own onnxruntime backends. NVIDIA's perf_analyzer drives
gRPC at concurrency 1, 8 and 32 and HTTP (binary tensors) at 1 and 8; wrk drives HTTP JSON at
8 connections; perf_analyzer sends a 64 KB and a 1 MB FP32 tensor over both protocols; and a
dynamically batched `simple` takes 64 gRPC clients; the 1 MB tensor goes once more through
system shared memory (Triton's extension, which both servers offer). Loads alternate between
the servers (which one goes first alternates by round), so that a noisy machine treats both
alike. Every answer is checked: perf_analyzer validates each response against
`validation_data`, wrk's script counts the answers that do not carry the expected sums.

For each server and load: requests/s, p50 and p99 (client-side), and the server's CPU per
request (its process and children, from /proc, over the requests its statistics API counted);
for the batched model also the mean batch each server formed (requests per execution, from
the same statistics).

    python bench/vs_triton.py --tritonserver \
        /tmp/tritonserver/pytriton/tritonserver/bin/tritonserver
    python bench/vs_triton.py --quick      # one round, shorter windows

``--tritonserver`` is any install's binary (the NGC container's, or the one in the PyPI wheel
nvidia-pytriton with Triton's onnxruntime backend beside it); its backends are looked for
beside it (``--backend-directory``).
perf_analyzer comes from the tritonclient 2.50.0 wheel, downloaded into ``--tools`` with
libcudart from PyPI (it needs no GPU for these loads) and Debian's libb64-0d.

Prints a table and ends with one line of figures (each load's ratio enginehouse / Triton).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_use import CpuSnapshot  # noqa: E402
from loadgen import wrk  # noqa: E402
from make_repository import SIMPLE_CONFIG, simple_model  # noqa: E402

from enginehouse.testing import ServerProcess, free_ports  # noqa: E402

A = list(range(16))
B = [1] * 16

IDENTITY_CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {size} ] }}]
output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {size} ] }}]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

BATCHED = "dynamic_batching { max_queue_delay_microseconds: 200 }\n"


@dataclass(frozen=True)
class Load:
    """One row: a model, a tool, a protocol and a concurrency."""

    name: str
    model: str
    tool: str  # "perf_analyzer" or "wrk"
    protocol: str  # "grpc" or "http"
    concurrency: int
    # perf_analyzer's --shared-memory: tensors in system shared memory ("" for none).
    shared_memory: str = ""


LOADS = [
    Load("gRPC c1", "simple", "perf_analyzer", "grpc", 1),
    Load("gRPC c8", "simple", "perf_analyzer", "grpc", 8),
    Load("gRPC c32", "simple", "perf_analyzer", "grpc", 32),
    Load("HTTP binary c1", "simple", "perf_analyzer", "http", 1),
    Load("HTTP binary c8", "simple", "perf_analyzer", "http", 8),
    Load("HTTP JSON wrk c8", "simple", "wrk", "http", 8),
    Load("64 KB gRPC c8", "identity_64k", "perf_analyzer", "grpc", 8),
    Load("64 KB HTTP c8", "identity_64k", "perf_analyzer", "http", 8),
    Load("1 MB gRPC c8", "identity_1m", "perf_analyzer", "grpc", 8),
    Load("1 MB HTTP c8", "identity_1m", "perf_analyzer", "http", 8),
    Load("1 MB gRPC c8 shm", "identity_1m", "perf_analyzer", "grpc", 8, "system"),
    Load("1 MB HTTP c8 shm", "identity_1m", "perf_analyzer", "http", 8, "system"),
    Load("batched gRPC c64", "simple_batched", "perf_analyzer", "grpc", 64),
]


@dataclass
class Measured:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    errors: int = 0
    # Requests per model execution: how large the batches were that the server formed.
    mean_batch: float = 1.0


def identity_model(size: int) -> onnx.ModelProto:
    tensor = ["batch", size]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, tensor)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, tensor)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


SIZES = {"identity_64k": 16 * 1024, "identity_1m": 256 * 1024}


def write_repository(root: Path) -> Path:
    """The repository both servers serve, in Triton's layout."""
    for name, config in (
        ("simple", SIMPLE_CONFIG.format(name="simple", max_batch=8)),
        ("simple_batched", SIMPLE_CONFIG.format(name="simple_batched", max_batch=64) + BATCHED),
    ):
        (root / name / "1").mkdir(parents=True)
        model = simple_model(batch=True)
        model.ir_version = 8
        onnx.save(model, str(root / name / "1" / "model.onnx"))
        (root / name / "config.pbtxt").write_text(config)
    for name, size in SIZES.items():
        (root / name / "1").mkdir(parents=True)
        onnx.save(identity_model(size), str(root / name / "1" / "model.onnx"))
        (root / name / "config.pbtxt").write_text(IDENTITY_CONFIG.format(name=name, size=size))
    return root


def input_data(folder: Path) -> dict[str, Path]:
    """perf_analyzer's input files, with the answers every response must carry."""
    files = {}
    simple = {
        "data": [
            {"INPUT0": {"content": A, "shape": [16]}, "INPUT1": {"content": B, "shape": [16]}}
        ],
        "validation_data": [
            {
                "OUTPUT0": {"content": [a + b for a, b in zip(A, B)]},
                "OUTPUT1": {"content": [a - b for a, b in zip(A, B)]},
            }
        ],
    }
    for name in ("simple", "simple_batched"):
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps(simple))
    for name, size in SIZES.items():
        values = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        content = [float(v) for v in values]
        files[name] = folder / f"{name}.json"
        files[name].write_text(
            json.dumps(
                {
                    "data": [{"INPUT0": {"content": content, "shape": [size]}}],
                    "validation_data": [{"OUTPUT0": {"content": content}}],
                }
            )
        )
        # perf_analyzer cannot validate outputs it placed in shared memory (it fails every
        # request, against either server): those loads send the same data unvalidated, and
        # check_shared_memory() checks one answer of each server through shared memory.
        files[f"{name}/shm"] = folder / f"{name}.shm.json"
        files[f"{name}/shm"].write_text(
            json.dumps({"data": [{"INPUT0": {"content": content, "shape": [size]}}]})
        )
    return files


def check_shared_memory(http_port: int, grpc_port: int) -> None:
    """One 1 MB request through system shared memory on each protocol, its answer checked."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    size = SIZES["identity_1m"]
    data = np.random.default_rng(1).standard_normal((1, size)).astype(np.float32)
    for module, url in (
        (httpclient, f"127.0.0.1:{http_port}"),
        (grpcclient, f"127.0.0.1:{grpc_port}"),
    ):
        client = module.InferenceServerClient(url)
        region_in = shm.create_shared_memory_region("check_in", "/vs_triton_in", data.nbytes)
        region_out = shm.create_shared_memory_region("check_out", "/vs_triton_out", data.nbytes)
        try:
            shm.set_shared_memory_region(region_in, [data])
            client.register_system_shared_memory("check_in", "/vs_triton_in", data.nbytes)
            client.register_system_shared_memory("check_out", "/vs_triton_out", data.nbytes)
            item = module.InferInput("INPUT0", [1, size], "FP32")
            item.set_shared_memory("check_in", data.nbytes)
            requested = module.InferRequestedOutput("OUTPUT0")
            requested.set_shared_memory("check_out", data.nbytes)
            client.infer("identity_1m", [item], outputs=[requested])
            answer = shm.get_contents_as_numpy(region_out, np.float32, [1, size])
            if not np.array_equal(answer, data):
                raise AssertionError(f"{url}: wrong answer through shared memory")
        finally:
            client.unregister_system_shared_memory()
            shm.destroy_shared_memory_region(region_in)
            shm.destroy_shared_memory_region(region_out)


def perf_analyzer(tools: Path) -> tuple[Path, dict[str, str]]:
    """NVIDIA's perf_analyzer from the tritonclient 2.50.0 wheel, and the environment it
    runs in; fetched into ``tools`` the first time."""
    binary = tools / "tritonclient-2.50.0.data" / "data" / "bin" / "perf_analyzer"
    cudart = tools / "cudart" / "nvidia" / "cuda_runtime" / "lib"
    if not binary.exists() or not cudart.exists():
        print(f"fetching perf_analyzer into {tools} ...", flush=True)
        tools.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "-q", "--no-deps"),
                *("--only-binary=:all:", "tritonclient==2.50.0", "nvidia-cuda-runtime-cu12"),
                *("-d", str(tools)),
            ],
            check=True,
        )
        for wheel in tools.glob("tritonclient-2.50.0-*.whl"):
            shutil.unpack_archive(wheel, tools, "zip")
        for wheel in tools.glob("nvidia_cuda_runtime_cu12-*.whl"):
            shutil.unpack_archive(wheel, tools / "cudart", "zip")
        binary.chmod(0o755)
    if (
        subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout.find(
            "libb64.so.0d"
        )
        < 0
    ):
        print("installing Debian's libb64-0d (perf_analyzer needs it) ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "libb64-0d"], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(cudart))
    return binary, env


class Triton:
    """tritonserver over the repository, on free loopback ports."""

    def __init__(self, binary: Path, backends: Path, repo: Path, log: Path) -> None:
        self.http_port, self.grpc_port, metrics = free_ports(3)
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [
                str(binary),
                f"--backend-directory={backends}",
                f"--model-repository={repo}",
                f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-port={metrics}",
                "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1",
                "--allow-gpu-metrics=false",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not _ready(self.http_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self._log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def served(http_port: int, model: str) -> tuple[int, int]:
    """Requests the server's statistics API counts as answered for ``model``, and the model
    executions that answered them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/stats") as r:
        stats = json.load(r)["model_stats"]
    requests = sum(int(s["inference_stats"]["success"]["count"]) for s in stats)
    return requests, sum(int(s.get("execution_count", 0)) for s in stats)


def run_perf_analyzer(
    tool: tuple[Path, dict[str, str]],
    load: Load,
    port: int,
    data: Path,
    seconds: float,
    out: Path,
) -> tuple[float, float, float]:
    binary, env = tool
    report = out / "pa.csv"
    command = [
        str(binary),
        "-m",
        load.model,
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        load.protocol,
        "--concurrency-range",
        f"{load.concurrency}:{load.concurrency}",
        "--measurement-interval",
        str(int(seconds * 1000)),
        # These machines are noisy: a window within 100% of the others is taken rather than
        # failing the run (each reported figure is still one window's measurement).
        "--stability-percentage",
        "100",
        "--max-trials",
        "4",
        "--input-data",
        str(data),
        "-f",
        str(report),
    ]
    if load.concurrency > 4:
        command += ["--max-threads", str(load.concurrency)]
    if load.shared_memory:
        size = SIZES.get(load.model, 16) * 4
        command += [f"--shared-memory={load.shared_memory}", f"--output-shared-memory-size={size}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    with open(report) as handle:
        row = next(csv.DictReader(handle))
    return (
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
    )


def measure(
    load: Load,
    server: str,
    http_port: int,
    grpc_port: int,
    pid: int,
    tool: tuple[Path, dict[str, str]],
    data: dict[str, Path],
    seconds: float,
    out: Path,
) -> Measured:
    before_count, before_runs = served(http_port, load.model)
    before_cpu = CpuSnapshot.take(pid)
    errors = 0
    if load.tool == "wrk":
        body = json.dumps(
            {
                "inputs": [
                    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": A},
                    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": B},
                ]
            }
        ).encode()
        expect = json.dumps([a + b for a, b in zip(A, B)], separators=(",", ":"))
        result = wrk(
            f"http://127.0.0.1:{http_port}/v2/models/{load.model}/infer",
            body,
            {"Content-Type": "application/json"},
            load.concurrency,
            seconds * 3,
            expect=expect,
        )
        rps, p50, p99, errors = result.rps, result.p50_ms, result.p99_ms, result.errors
    else:
        port = grpc_port if load.protocol == "grpc" else http_port
        inputs = data[f"{load.model}/shm" if load.shared_memory else load.model]
        rps, p50, p99 = run_perf_analyzer(tool, load, port, inputs, seconds, out)
    after_cpu = CpuSnapshot.take(pid)
    after_count, after_runs = served(http_port, load.model)
    count, runs = after_count - before_count, after_runs - before_runs
    cpu_s = after_cpu.seconds_since(before_cpu)
    return Measured(rps, p50, p99, cpu_s * 1e6 / max(count, 1), errors, count / max(runs, 1))


def plot(rows: dict[str, dict[str, list[Measured]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(rows)
    ratios = [
        statistics.median(m.rps for m in rows[n]["enginehouse"])
        / statistics.median(m.rps for m in rows[n]["triton"])
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(names, ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("enginehouse / tritonserver req/s")
    ax.set_title("same model, same machine, alternating rounds")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--tritonserver",
        type=Path,
        default=Path("/tmp/tritonserver/pytriton/tritonserver/bin/tritonserver"),
    )
    parser.add_argument("--backend-directory", type=Path, default=None)
    parser.add_argument("--tools", type=Path, default=Path("/tmp/enginehouse-bench-tools"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="perf_analyzer window")
    parser.add_argument("--loads", default="", help="comma-separated row names (default all)")
    parser.add_argument("--quick", action="store_true", help="one round, 1.5 s windows")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument(
        "--serve-flags",
        default="",
        help="further `enginehouse serve` flags, e.g. '--grpc-frontend native'",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 1.5
    if not args.tritonserver.exists():
        print(f"no tritonserver at {args.tritonserver}: give an install's binary (--tritonserver)")
        return 2
    backends = args.backend_directory or args.tritonserver.parent.parent / "backends"
    loads = [load for load in LOADS if not args.loads or load.name in args.loads.split(",")]
    tool = perf_analyzer(args.tools)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list[Measured]]] = {
        load.name: {"enginehouse": [], "triton": []} for load in loads
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = write_repository(work / "repo")
        data = input_data(work)
        ours = ServerProcess([repo], *args.serve_flags.split(), log_path=work / "enginehouse.log")
        ours.wait_ready()
        theirs = Triton(args.tritonserver, backends, repo, work / "triton.log")
        servers: dict[str, tuple[int, int, int]] = {
            "enginehouse": (ours.http_port, ours.grpc_port, ours.process.pid),
            "triton": (theirs.http_port, theirs.grpc_port, theirs.process.pid),
        }
        try:
            for http_port, grpc_port, _ in servers.values():
                check_shared_memory(http_port, grpc_port)
            total = args.rounds * len(loads) * 2
            done = 0
            for round_ in range(args.rounds):
                order = ["enginehouse", "triton"] if round_ % 2 == 0 else ["triton", "enginehouse"]
                for load in loads:
                    for server in order:
                        http_port, grpc_port, pid = servers[server]
                        measured = measure(
                            load, server, http_port, grpc_port, pid, tool, data, args.seconds, work
                        )
                        rows[load.name][server].append(measured)
                        done += 1
                        batch = measured.mean_batch
                        print(
                            f"[{done}/{total}] round {round_ + 1} {load.name:18s} {server:11s} "
                            f"{measured.rps:8.0f} req/s  p50 {measured.p50_ms:6.2f} ms  "
                            f"p99 {measured.p99_ms:6.2f} ms  CPU {measured.cpu_us:6.0f} us/req"
                            + (f"  batch {batch:.1f}" if batch > 1 else "")
                            + (f"  {measured.errors} WRONG" if measured.errors else ""),
                            flush=True,
                        )
        finally:
            ours.stop()
            theirs.stop()
    return report(rows, args.out)


def report(rows: dict[str, dict[str, list[Measured]]], out: Path) -> int:
    def median(values: list[Measured], pick: Callable[[Measured], float]) -> float:
        return statistics.median(pick(m) for m in values)

    print()
    print(
        f"{'load':18s} {'ours req/s':>10s} {'Triton':>8s} {'ratio':>6s}  "
        f"{'p50 ours/Triton ms':>19s}  {'p99 ours/Triton ms':>19s}  {'CPU us/req ours/Triton':>22s}"
    )
    figures = []
    wrong = 0
    for name, by_server in rows.items():
        ours, theirs = by_server["enginehouse"], by_server["triton"]
        ratio = median(ours, lambda m: m.rps) / max(median(theirs, lambda m: m.rps), 1e-9)
        wrong += sum(m.errors for m in ours + theirs)
        print(
            f"{name:18s} {median(ours, lambda m: m.rps):10.0f} "
            f"{median(theirs, lambda m: m.rps):8.0f} {ratio:6.2f}  "
            f"{median(ours, lambda m: m.p50_ms):9.2f}/{median(theirs, lambda m: m.p50_ms):<9.2f}  "
            f"{median(ours, lambda m: m.p99_ms):9.2f}/{median(theirs, lambda m: m.p99_ms):<9.2f}  "
            f"{median(ours, lambda m: m.cpu_us):10.0f}/{median(theirs, lambda m: m.cpu_us):<10.0f}"
        )
        figures.append(f"{name} {ratio:.2f}x")
    (out / "vs_triton.json").write_text(
        json.dumps(
            {n: {s: [m.__dict__ for m in ms] for s, ms in b.items()} for n, b in rows.items()},
            indent=1,
        )
    )
    plot(rows, out / "vs_triton.png")
    print(
        f"vs_triton: req/s ratio enginehouse/tritonserver: {'; '.join(figures)}; "
        f"wrong answers {wrong}"
    )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
