"""Served GPU engines: BERT-base and ResNet-50 through `enginehouse serve` under gRPC load.

For each model: start the server (dynamic batching, 3 GPU instances, 8 gRPC worker
processes) on the engine cache of bench/gpu_engines.py, and time process start -> ready and
the first request against the steady p50; drive it with closed-loop clients in many
processes (pre-serialised ModelInfer messages, bench/loadgen.py) and with open-loop loads at
fixed rates (``--rates``: the fair test of throughput and p99 together, since closed-loop
clients slow down with the server), and read the batch size the batcher formed and one
batch's time from the server's statistics; then, with the server stopped, run the raw engine
(one instance, host arrays in and out, as the server runs it) at that batch size. Served
throughput / raw throughput is the figure of merit (goal: >= 80% for BERT, p99 <= 10 ms).

    python bench/gpu_serving.py [--seconds 10] [--clients 32,128] [--rates 4000,8000]
                                [--grpc-workers 8] [--shared-memory none,system,cuda,cuda+out]
                                [--no-bytecode-cache] [--profile]

Servers cache Python's compiled bytecode (under bench/out/gpu/pycache) as an installed
image does; ``--no-bytecode-cache`` runs them as the device image is, which sets
PYTHONDONTWRITEBYTECODE and ships no .pyc files for torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_use import CpuSnapshot, cpu_report
from gpu_engines import OUT, PRECISION, RESULTS
from gpu_models import MODELS, BenchModel, gpu_config
from loadgen import grpc_load, grpc_open_load
from py_spy import find_py_spy, record, report

from enginehouse.testing import SERVER_MODULES, ServerProcess, keep_bytecode

# The dynamic batcher's longest wait for a fuller batch (--queue-delay-us), and the GPU
# instances (--instances), per model, from sweeps on the H200 (bench/RESULTS.md, 2026-12-03).
# BERT, 3 instances: 100 us served 16 clients at 1.03x raw and 32 at 1.05x, against 0.66x and
# 0.88x with 300 us in the same run; 0 us formed smaller batches at more CPU per request
# (1.15x, but 4,912/s against 5,848/s at 16 clients). ResNet-50 at 64 clients: 3 instances
# and 1000 us served 0.75x raw, against 0.60x for 2 instances and 2000 us (2026-12-03). Once
# system regions were pinned (2026-12-04), 300 us served them at 0.94-0.99x raw against
# 0.72x with 1000 us, and images in the request at 0.86x in the same run.
QUEUE_DELAY_US = {"bert": 100, "resnet50": 300}
INSTANCES = {"bert": 3, "resnet50": 3}
MAX_BATCH = {"bert": 64, "resnet50": 64}
# Each model's output and its FP32 elements per sample (``--shared-memory cuda+out``).
OUTPUT = {"bert": ("embedding", 768), "resnet50": ("logits", 1000)}


def message(model: BenchModel, region: str = "", output_region: str = "") -> bytes:
    """One request of one sample; with ``region``, its inputs are read from that
    shared-memory region (one after another, as :class:`InputRegion` wrote them) and only
    their names, shapes and places travel; with ``output_region``, its output is written
    there rather than sent (every request into the same place, as perf_analyzer's
    --shared-memory does)."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model.name)
    offset = 0
    for name, array in model.inputs(1).items():
        datatype = "INT64" if array.dtype == np.int64 else "FP32"
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if region:
            tensor.parameters["shared_memory_region"].string_param = region
            tensor.parameters["shared_memory_offset"].int64_param = offset
            tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
            offset += array.nbytes
        else:
            request.raw_input_contents.append(array.tobytes())
    if output_region:
        name, width = OUTPUT[model.name]
        output = request.outputs.add(name=name)
        output.parameters["shared_memory_region"].string_param = output_region
        output.parameters["shared_memory_byte_size"].int64_param = width * 4
    return request.SerializeToString()


class Region:
    """A system or CUDA shared-memory region registered with the server: one sample's
    inputs (``arrays``), which every client's requests read, or ``size`` bytes for one
    sample's output, which every request writes (as perf_analyzer's --shared-memory does)."""

    def __init__(
        self, kind: str, name: str, grpc_url: str, arrays: list[np.ndarray], size: int = 0
    ) -> None:
        import tritonclient.grpc as grpcclient

        self.kind = kind
        self.name = name
        self.client = grpcclient.InferenceServerClient(grpc_url)
        size = size or sum(a.nbytes for a in arrays)
        if kind == "system":
            import tritonclient.utils.shared_memory as shm

            self._shm: Any = shm
            self.handle = shm.create_shared_memory_region(name, f"/{name}", size)
            if arrays:
                shm.set_shared_memory_region(self.handle, arrays)
            self.client.register_system_shared_memory(name, f"/{name}", size)
        else:
            import tritonclient.utils.cuda_shared_memory as cudashm

            self._shm = cudashm
            self.handle = cudashm.create_shared_memory_region(name, size, 0)
            if arrays:
                cudashm.set_shared_memory_region(self.handle, arrays)
            raw = cudashm.get_raw_handle(self.handle)
            self.client.register_cuda_shared_memory(name, raw, 0, size)

    def close(self) -> None:
        if self.kind == "system":
            self.client.unregister_system_shared_memory(self.name)
        else:
            self.client.unregister_cuda_shared_memory(self.name)
        self._shm.destroy_shared_memory_region(self.handle)


def regions_for(how: str, model: BenchModel, grpc_url: str) -> list[Region]:
    """The regions one ``--shared-memory`` choice uses: the inputs' (``system``, ``cuda``),
    and the output's as well for ``system+out`` and ``cuda+out``."""
    kind = how.removesuffix("+out")
    name = f"bench_{how.replace('+', '_')}_{model.name}"
    regions = [Region(kind, name, grpc_url, list(model.inputs(1).values()))]
    if how.endswith("+out"):
        regions.append(Region(kind, f"{name}_out", grpc_url, [], OUTPUT[model.name][1] * 4))
    return regions


def stats(port: int, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats") as reply:
        return json.loads(reply.read())["model_stats"][0]  # type: ignore[no-any-return]


def infer_ms(before: dict[str, Any], after: dict[str, Any]) -> float:
    """The server's mean compute_infer between two statistics readings: the time of the
    batch each request ran in (ms), as the instances measured it."""
    spent = after["inference_stats"]["compute_infer"]
    was = before["inference_stats"]["compute_infer"]
    return (spent["ns"] - was["ns"]) / max(1, spent["count"] - was["count"]) / 1e6


def first_and_steady(server: ServerProcess, model: BenchModel) -> dict[str, float]:
    """The first request after ready against the steady p50 of the next 200 (ms), seen by
    the client and by the server (its statistics: queue to response, no network), and the
    first request of a second new connection once the server is warm. A new HTTP/2
    connection starts with a small flow-control window that gRPC grows as data flows, so a
    large first message pays for the connection as well; that second connection shows how
    much of the first request's time is the connection's rather than the server's."""
    import tritonclient.grpc as grpcclient

    items = []
    for name, array in model.inputs(1).items():
        item = grpcclient.InferInput(
            name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32"
        )
        item.set_data_from_numpy(array)
        items.append(item)

    def timed(count: int) -> list[float]:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.is_server_ready()  # connect first: the first request times the model, not TCP
        times = []
        for _ in range(count):
            start = time.perf_counter()
            client.infer(model.name, items)
            times.append((time.perf_counter() - start) * 1e3)
        client.close()
        return times

    def served_ns() -> tuple[int, int]:
        success = stats(server.http_port, model.name)["inference_stats"]["success"]
        return int(success["ns"]), int(success["count"])

    began = served_ns()
    first = timed(1)[0]
    after_first = served_ns()
    rest = timed(200)
    after_rest = served_ns()
    fresh = timed(1)[0]
    return {
        "first_ms": round(first, 3),
        "steady_p50_ms": round(float(np.median(rest)), 3),
        "fresh_connection_ms": round(fresh, 3),
        "server_first_ms": round((after_first[0] - began[0]) / 1e6, 3),
        "server_steady_ms": round(
            (after_rest[0] - after_first[0]) / max(1, after_rest[1] - after_first[1]) / 1e6, 3
        ),
    }


def raw_engine(model: BenchModel, batch: int, seconds: float) -> float:
    """Items per second of one engine instance executing host arrays of ``batch`` rows."""
    from gpu_engines import build

    _, instance, _, _, _ = build(model, PRECISION[model.kind], False)
    engine = instance()
    host = model.inputs(batch)
    outputs = [t.name for t in engine.config.output]
    for _ in range(10):
        engine.execute(host, outputs)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.execute(host, outputs)
        count += 1
    elapsed = time.perf_counter() - start
    engine.close()
    return count * batch / elapsed


def serve(model: BenchModel, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per client count: served rate and latency, batch formed, raw engine there."""
    import dataclasses

    served = dataclasses.replace(model, max_batch_size=MAX_BATCH[model.name])
    delay = QUEUE_DELAY_US[model.name] if args.queue_delay_us is None else args.queue_delay_us
    instances = INSTANCES[model.name] if args.instances is None else args.instances
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}\n"
    config = gpu_config(PRECISION[model.kind], count=instances, extra=batching)
    print(f"  {model.name}: {instances} instances, queue delay {delay} us", flush=True)
    served.write(OUT / "serve-repo", config)
    starts: list[float] = []
    common: dict[str, Any] = {"model": model.name}
    # Per load: its label, result, the batch the batcher formed, one batch's time in the
    # server (compute_infer, ms) and the CPU it cost.
    loads: list[tuple[str, Any, float, float, dict[str, Any]]] = []
    for attempt in range(2):  # the first start may build; the second finds everything cached
        began = time.perf_counter()
        server = ServerProcess(
            [OUT / "serve-repo"],
            "--engine-cache",
            str(OUT / "cache"),
            "--load-model",
            model.name,
            "--model-control-mode",
            "explicit",
            "--grpc-workers",
            str(args.grpc_workers),
            "--grpc-frontend",
            args.grpc_frontend,
            *args.server_flag,
            log_path=OUT / f"serve-{model.name}-{attempt}.log",
        )
        try:
            server.wait_ready(timeout_s=900, fail_fast=True)
            starts.append(time.perf_counter() - began)
            print(f"  {model.name}: start {attempt + 1} ready in {starts[-1]:.1f} s", flush=True)
            # On the first (cold) start this only warms this process's client code, so that
            # the cached start times the server's first request, not tritonclient's.
            first = first_and_steady(server, served)
            if attempt == 0:
                continue
            common |= first
            print(f"  {model.name}: first request {first}", flush=True)
            target = f"127.0.0.1:{server.grpc_port}"
            choices = {
                how: regions_for(how, served, target) for how in args.shared_memory if how != "none"
            }
            if "none" in args.shared_memory:
                choices = {"": [], **choices}
            runs: list[tuple[str, Any]] = []
            for how, regions in choices.items():
                request = message(
                    served,
                    regions[0].name if regions else "",
                    regions[1].name if len(regions) > 1 else "",
                )
                mark = f" {how}" if how else ""
                runs += [
                    (
                        f"{clients} clients{mark}",
                        partial(grpc_load, target, request, clients, args.seconds, args.processes),
                    )
                    for clients in args.clients
                ] + [
                    (
                        f"{rate}/s open{mark}",
                        partial(
                            grpc_open_load, target, request, rate, args.seconds, args.processes
                        ),
                    )
                    for rate in args.rates
                ]
            spy = find_py_spy(args.py_spy) if args.profile else None
            for label, run in runs:
                before = stats(server.http_port, model.name)
                cpu_before = CpuSnapshot.take(server.process.pid)
                named = label.replace(" ", "-").replace("/", "")
                profile = OUT / f"py-spy-{model.name}-{named}.txt"
                sampler = (
                    record(spy, server.process.pid, args.seconds - 1, profile) if spy else None
                )
                load = run()
                cpu = cpu_report(
                    cpu_before, CpuSnapshot.take(server.process.pid), load.seconds, load.requests
                )
                cpu["loadgen_cores"] = round(load.client_cpu_s / load.seconds, 2)
                after = stats(server.http_port, model.name)
                executions = after["execution_count"] - before["execution_count"]
                inferences = after["inference_count"] - before["inference_count"]
                batch = inferences / max(executions, 1)
                loads.append((label, load, batch, infer_ms(before, after), cpu))
                print(
                    f"  {model.name} {label}: {load.rps:.0f}/s, p99 {load.p99_ms:.1f} ms, "
                    f"batch {batch:.1f}, {cpu}",
                    flush=True,
                )
                if sampler is not None and sampler.wait() == 0 and profile.is_file():
                    print(report(profile, "MainThread"), flush=True)
                    print(report(profile), flush=True)
            for regions in choices.values():
                for region in regions:
                    region.close()
        finally:
            server.stop()
    common |= {"cold_start_s": round(starts[0], 2), "cached_start_s": round(starts[1], 2)}
    rows = []
    for label, load, batch, server_infer_ms, cpu in loads:
        rows_per_batch = max(1, round(batch))
        raw = raw_engine(model, rows_per_batch, 5.0)
        rows.append(
            common
            | {
                "load": label,
                "served_per_s": round(load.rps, 1),
                "p50_ms": round(load.p50_ms, 2),
                "p99_ms": round(load.p99_ms, 2),
                "errors": load.errors,
                "mean_batch": round(batch, 1),
                # One batch in the server (its compute_infer, on the GPU while other
                # instances run too) against one back-to-back raw execution at that size.
                "server_infer_ms": round(server_infer_ms, 3),
                "raw_batch_ms": round(rows_per_batch / raw * 1e3, 3),
                "raw_per_s": round(raw, 1),
                "served_vs_raw": round(load.rps / raw, 3),
                "cpu": cpu,
            }
        )
    return rows


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Served requests/s per load (bars, one colour per run) with the ratio to the raw engine
    at the batch formed written on each; nothing where matplotlib is not installed (the
    ``bench`` extra has it). ``--plot`` draws saved runs side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    loads = list(dict.fromkeys(f"{r['model']} {r['load']}" for rows in runs.values() for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(loads) * len(runs) ** 0.5), 4.5))
    width = 0.8 / len(runs)
    for i, (label, rows) in enumerate(runs.items()):
        by_load = {f"{r['model']} {r['load']}": r for r in rows}
        xs = [j + i * width for j, load in enumerate(loads) if load in by_load]
        found = [by_load[load] for load in loads if load in by_load]
        bars = ax.bar(xs, [r["served_per_s"] for r in found], width, label=label)
        for bar, r in zip(bars, found):
            ax.annotate(
                f"{r['served_vs_raw']:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(loads))], loads)
    ax.set_ylabel("served requests/s (x raw engine at the batch formed)")
    ax.set_title("bench/gpu_serving.py")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert,resnet50")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--clients",
        type=lambda t: [int(c) for c in t.split(",")],
        default=[128],
        help="e.g. 32,128",
    )
    parser.add_argument(
        "--rates",
        type=lambda t: [int(c) for c in t.split(",") if c],
        default=[],
        help="open-loop loads in requests/s, e.g. 4000,8000 (latency counted from when each "
        "request was due)",
    )
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--grpc-workers", type=int, default=8, help="frontend processes")
    parser.add_argument(
        "--grpc-frontend", choices=("native", "grpcio"), default="grpcio", help="in the workers"
    )
    parser.add_argument(
        "--shared-memory",
        type=lambda t: t.split(","),
        default=["none"],
        help="how inputs reach the server, one run of the loads each: none (in the "
        "request), system, cuda, or system+out, cuda+out (the output written into a region "
        "too); e.g. none,system,cuda+out",
    )
    parser.add_argument(
        "--instances", type=int, default=None, help=f"GPU instances (default: {INSTANCES})"
    )
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help=f"the batcher's max_queue_delay_microseconds (default: per model, {QUEUE_DELAY_US})",
    )
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        help="a further flag for `enginehouse serve`, e.g. --server-flag=--grpc-relay-ring-mb=0",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the server's Python stacks with py-spy during each load (collapsed "
        "stacks under bench/out/gpu; the event loop's and all threads' dearest functions printed)",
    )
    parser.add_argument("--py-spy", default=None, help="the py-spy executable (default: on PATH)")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="servers compile Python modules from source on every start",
    )
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar="LABEL=FILE.json",
        help="only draw saved runs (their gpu_serving.json) side by side into --plot-to",
    )
    parser.add_argument("--plot-to", type=Path, default=RESULTS / "gpu_serving.png")
    args = parser.parse_args()
    if args.plot:
        saved = dict(item.split("=", 1) for item in args.plot)
        plot({k: json.loads(Path(v).read_text()) for k, v in saved.items()}, args.plot_to)
        return
    if not args.no_bytecode_cache:
        keep_bytecode(OUT / "pycache", (*SERVER_MODULES, "torch", "enginehouse.backends.torch"))
    rows = [row for name in args.models.split(",") for row in serve(MODELS[name], args)]
    print(
        f"\n{'model':9} {'load':>12} {'served/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'batch':>6} {'raw/s':>9} "
        f"{'ratio':>6} {'cold s':>7} {'cached s':>8} {'first ms':>8} {'p50 ms':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:9} {r['load']:>12} {r['served_per_s']:9.1f} {r['p50_ms']:7.2f} "
            f"{r['p99_ms']:7.2f} "
            f"{r['mean_batch']:6.1f} {r['raw_per_s']:9.1f} {r['served_vs_raw']:5.2f}x "
            f"{r['cold_start_s']:7.1f} {r['cached_start_s']:8.1f} {r['first_ms']:8.2f} "
            f"{r['steady_p50_ms']:7.2f}"
        )
    print(
        "\nPer load: one batch in the server (compute_infer) against one raw execution at that "
        "batch,\nand the CPU it cost (event loop busy fraction; core and gRPC workers us/request):"
    )
    for r in rows:
        print(
            f"  {r['model']:9} {r['load']:>12} batch {r['server_infer_ms']:.2f} ms in the "
            f"server, {r['raw_batch_ms']:.2f} ms raw; {r['cpu']}"
        )
    print("\nFirst request after a cached start (ms): client / server (its statistics):")
    for r in {r["model"]: r for r in rows}.values():
        print(
            f"  {r['model']:9} first {r['first_ms']:.2f} / {r['server_first_ms']:.2f}, steady "
            f"{r['steady_p50_ms']:.2f} (p50) / {r['server_steady_ms']:.2f} (mean): "
            f"{r['first_ms'] / r['steady_p50_ms']:.2f}x / "
            f"{r['server_first_ms'] / r['server_steady_ms']:.2f}x; a new connection's first "
            f"request once warm {r['fresh_connection_ms']:.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_serving.json").write_text(json.dumps(rows, indent=1))
    plot({"this run": rows}, RESULTS / "gpu_serving.png")
    print(
        "gpu_serving: "
        + "; ".join(
            f"{r['model']} @{r['load']} {r['served_per_s']:.0f}/s = "
            f"{r['served_vs_raw']:.2f}x raw at batch "
            f"{r['mean_batch']}, p99 {r['p99_ms']:.1f} ms, cached start {r['cached_start_s']:.1f} s"
            for r in rows
        )
    )


if __name__ == "__main__":
    main()
