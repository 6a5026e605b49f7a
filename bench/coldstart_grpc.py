"""First request through gRPC worker processes against steady state.

The server runs with ``--grpc-workers`` (the setting for GPU serving). For a 588 KB image
request (FP32 [3, 224, 224], ResNet's input; a trivial ONNX model behind it) and the small
``simple`` request of the example repository: the latency of the first request after the
server reports ready, against the p50 of the next 100, with warm-up on and off; and, for
scale, the median of requests that each follow 0.2 s of idle (as the first one follows
the wait for ready), which pay for waking sleeping threads and cold caches. The client
process is warmed against another server first, so that tritonclient's and grpcio's own
first-call costs stay out of the figure; each figure is the median over ``--runs`` fresh
server processes (single requests on this shared machine vary 2x).

    python bench/coldstart_grpc.py [--runs 5] [--grpc-workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

import core_overhead  # noqa: E402
from make_repository import make_repository  # noqa: E402

from enginehouse.testing import ServerProcess, free_port  # noqa: E402


def inputs(model: str) -> list[grpcclient.InferInput]:
    if model == "m":  # the image model
        image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        item = grpcclient.InferInput("image", list(image.shape), "FP32")
        item.set_data_from_numpy(image)
        return [item]
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    items = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for item in items:
        item.set_data_from_numpy(data)
    return items


MODELS = {"image": "m", "simple": "simple"}
IDLE_SAMPLES = 5


def latencies(
    server: ServerProcess, model: str, count: int, idle: int = 0
) -> tuple[list[float], list[float]]:
    """``count`` back-to-back latencies (ms), then ``idle`` more, each after 0.2 s idle."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.is_server_ready()  # the channel is the client's cost, not the server's
    items = inputs(model)

    def one() -> float:
        start = time.perf_counter()
        client.infer(model, items)
        return (time.perf_counter() - start) * 1e3

    out = [one() for _ in range(count)]
    after_idle = []
    for _ in range(idle):
        time.sleep(0.2)
        after_idle.append(one())
    client.close()
    return out, after_idle


def start(repo: Path, workers: int, warmup: bool, log: Path) -> ServerProcess:
    server = ServerProcess(
        [repo],
        "--grpc-workers",
        str(workers),
        "--model-warmup",
        "true" if warmup else "false",
        log_path=log,
        grpc_port=free_port(),
    )
    server.wait_ready()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--grpc-workers", type=int, default=2)
    args = parser.parse_args()
    figures: dict[tuple[bool, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repository(Path(tmp) / "repo")
        core_overhead.write_model(repo, core_overhead.IMAGE)
        with start(repo, args.grpc_workers, True, Path(tmp) / "client-warm.log") as other:
            for model in MODELS.values():
                latencies(other, model, 20)
        for run in range(args.runs):
            for warmup in (True, False):
                with start(repo, args.grpc_workers, warmup, Path(tmp) / "serve.log") as server:
                    for label, model in MODELS.items():
                        times, after_idle = latencies(server, model, 101, IDLE_SAMPLES)
                        first, p50 = times[0], statistics.median(times[1:])
                        idle = statistics.median(after_idle)
                        figures.setdefault((warmup, label), []).append((first, p50, idle))
                        print(
                            f"run {run + 1}/{args.runs} warm-up {'on ' if warmup else 'off'} "
                            f"{label}: first {first:.2f} ms, p50 {p50:.2f} ms, "
                            f"after idle {idle:.2f} ms",
                            flush=True,
                        )
    print()
    print(
        f"{'warm-up':<8} {'request':<8} {'first ms':>9} {'p50 ms':>8} {'ratio':>6} "
        f"{'idle ms':>8} {'idle ratio':>10}"
    )
    ratios = {}
    for (warmup, label), rows in figures.items():
        first = statistics.median(r[0] for r in rows)
        p50 = statistics.median(r[1] for r in rows)
        idle = statistics.median(r[2] for r in rows)
        ratios[(warmup, label)] = first / p50
        ratios[(warmup, f"{label} idle")] = idle / p50
        print(
            f"{'on' if warmup else 'off':<8} {label:<8} {first:9.2f} {p50:8.2f} "
            f"{first / p50:5.2f}x {idle:8.2f} {idle / p50:9.2f}x"
        )
    print(
        f"coldstart_grpc: {args.grpc_workers} workers, first/p50 with warm-up: image "
        f"{ratios[(True, 'image')]:.2f}x, simple {ratios[(True, 'simple')]:.2f}x; without: "
        f"image {ratios[(False, 'image')]:.2f}x, simple {ratios[(False, 'simple')]:.2f}x; "
        f"any request after 0.2 s idle: image {ratios[(True, 'image idle')]:.2f}x, simple "
        f"{ratios[(True, 'simple idle')]:.2f}x (medians of {args.runs} runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
