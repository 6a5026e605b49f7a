"""Cold start: process start to ready, and the first request against steady state.

For the example repository (examples/make_repository.py), with warm-up on and off:
seconds from launching ``enginehouse serve`` to ``/v2/health/ready`` answering 200, then
the latency of the first request to each model below against the p50 of the next 200.
Requests go over one keep-alive HTTP connection (a raw socket client, so that the client's
own first-call costs stay out of the figure) with the binary tensor extension. Single
requests on this shared machine vary by 2x from one to the next, so every figure is the
median over ``--runs`` fresh server processes.

    python bench/coldstart.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_repository import make_repository  # noqa: E402

from enginehouse.testing import ServerProcess  # noqa: E402

MODELS = {
    "convnet": ("image", "FP32", np.random.default_rng(0).standard_normal((1, 3, 32, 32))),
    "simple": (None, "INT32", None),
}


def body(model: str) -> tuple[bytes, int]:
    if model == "simple":
        data = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = [("INPUT0", data), ("INPUT1", data)]
        datatype = "INT32"
    else:
        name, datatype, array = MODELS[model]
        inputs = [(name, np.asarray(array, np.float32))]  # type: ignore[list-item]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": datatype,
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for n, a in inputs
            ]
        }
    ).encode()
    return header + b"".join(a.tobytes() for _, a in inputs), len(header)


class RawClient:
    """Keep-alive HTTP/1.1 over a plain socket: one ``sendall`` per request, so the
    client adds as little (and as steady) time as Python allows."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def call(self, wire: bytes) -> int:
        assert self.sock is not None
        self.sock.sendall(wire)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return int(head.split(b" ", 2)[1])


def request_bytes(method: str, path: str, payload: tuple[bytes, int] | None = None) -> bytes:
    if payload is None:
        return f"{method} {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    body_bytes, header_length = payload
    return (
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body_bytes)}\r\n"
        f"Inference-Header-Content-Length: {header_length}\r\n\r\n"
    ).encode() + body_bytes


def one(client: RawClient, wire: bytes) -> float:
    start = time.perf_counter()
    status = client.call(wire)
    elapsed = (time.perf_counter() - start) * 1e3
    if status != 200:
        raise RuntimeError(f"HTTP {status}")
    return elapsed


def run(repo: Path, warmup: bool) -> dict[str, float]:
    server = ServerProcess([repo], "--model-warmup", "true" if warmup else "false")
    started = server.started
    try:
        client = RawClient(server.http_port)
        ready = request_bytes("GET", "/v2/health/ready")
        while True:
            try:
                if client.sock is None:
                    client.connect()
                if client.call(ready) == 200:
                    break
            except OSError:
                client.close()
            time.sleep(0.005)
        figures = {"ready_s": time.perf_counter() - started}
        for model in MODELS:
            wire = request_bytes("POST", f"/v2/models/{model}/infer", body(model))
            figures[f"{model}_first_ms"] = one(client, wire)
            steady = [one(client, wire) for _ in range(200)]
            figures[f"{model}_p50_ms"] = statistics.median(steady)
        client.close()
        return figures
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repository(Path(tmp) / "repo")
        results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for i in range(args.runs):
            for warmup in (True, False):
                figures = run(repo, warmup)
                results[warmup].append(figures)
                print(
                    f"run {i + 1}/{args.runs} warm-up {'on ' if warmup else 'off'}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()),
                    flush=True,
                )
    print()
    print(
        f"{'warm-up':<8} {'ready s':>8}"
        + "".join(f" {m + ' first ms':>18} {m + ' p50 ms':>16} {'ratio':>6}" for m in MODELS)
    )
    summary = {}
    for warmup in (True, False):
        rows = results[warmup]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        line = f"{'on' if warmup else 'off':<8} {med['ready_s']:8.2f}"
        for model in MODELS:
            ratio = med[f"{model}_first_ms"] / med[f"{model}_p50_ms"]
            summary[(warmup, model)] = ratio
            line += f" {med[f'{model}_first_ms']:18.3f} {med[f'{model}_p50_ms']:16.3f} {ratio:6.2f}"
        summary[(warmup, "ready")] = med["ready_s"]
        print(line)
    print(
        f"coldstart: ready {summary[(True, 'ready')]:.2f} s; first/p50 with warm-up: convnet "
        f"{summary[(True, 'convnet')]:.2f}x, simple {summary[(True, 'simple')]:.2f}x; "
        f"without: convnet {summary[(False, 'convnet')]:.2f}x, "
        f"simple {summary[(False, 'simple')]:.2f}x (medians of {args.runs} runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
