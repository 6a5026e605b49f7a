"""A fleet of enginehouse servers behind a real L7 balancer (HAProxy), on loopback: what a
Kubernetes Service with readiness-gated endpoints does, simulated with real processes.

HAProxy health-checks every server's ``/v2/health/ready`` twice a second and balances HTTP
requests and gRPC streams (HTTP/2, per request) over the ready ones. A rolling restart does
what a Deployment does with the bundle's preStop pause: the server is taken out of the
balancer first (HAProxy's runtime API: drain), then gets SIGTERM, finishes what it has,
exits, starts again and rejoins once its readiness probe passes. Used by
tests/deploy/test_balancer.py (short) and bench/scale_out.py (measured).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from enginehouse.testing import ServerProcess, free_ports

BODY = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
).encode()
EXPECTED = [i + 1 for i in range(16)]


@dataclass
class Member:
    """One server slot: its fixed ports and, while it runs, its process."""

    name: str
    http_port: int
    grpc_port: int
    metrics_port: int
    server: ServerProcess | None = None


class Fleet:
    """Servers and the HAProxy in front of them. ``slots`` members are declared to the
    balancer; ``running`` of them are started now (the others join later)."""

    def __init__(self, repository: Path, folder: Path, slots: int, running: int) -> None:
        self.repository = repository
        self.folder = folder
        ports = free_ports(3 * slots + 2)
        self.members = [Member(f"s{i + 1}", *ports[3 * i : 3 * i + 3]) for i in range(slots)]
        self.http_port, self.grpc_port = ports[-2:]
        self.socket_path = folder / "haproxy.sock"
        self._write_config()
        for member in self.members[:running]:
            self.start(member)
        for member in self.members[:running]:
            assert member.server is not None
            member.server.wait_ready()
        self.haproxy = subprocess.Popen(
            ["haproxy", "-f", str(folder / "haproxy.cfg"), "-db"],
            stdout=open(folder / "haproxy.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        self.wait_up([m.name for m in self.members[:running]])

    def _write_config(self) -> None:
        http_servers = "\n".join(
            f"    server {m.name} 127.0.0.1:{m.http_port} check" for m in self.members
        )
        grpc_servers = "\n".join(
            f"    server {m.name} 127.0.0.1:{m.grpc_port} proto h2"
            f" check port {m.http_port} check-proto h1"
            for m in self.members
        )
        (self.folder / "haproxy.cfg").write_text(
            f"""global
    maxconn 4096
    stats socket {self.socket_path} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
    default-server inter 500ms fall 1 rise 1
frontend http_in
    bind 127.0.0.1:{self.http_port}
    default_backend http_servers
frontend grpc_in
    bind 127.0.0.1:{self.grpc_port} proto h2
    default_backend grpc_servers
backend http_servers
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
{http_servers}
backend grpc_servers
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
{grpc_servers}
"""
        )

    def start(self, member: Member) -> None:
        member.server = ServerProcess(
            [self.repository],
            http_port=member.http_port,
            grpc_port=member.grpc_port,
            metrics_port=member.metrics_port,
            log_path=self.folder / f"{member.name}.log",
        )

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (UP, DOWN, DRAIN, MAINT...), by
        ``backend/server``."""
        found = {}
        for line in self.admin("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0].endswith("_servers") and fields[1].startswith("s"):
                found[f"{fields[0]}/{fields[1]}"] = fields[17]
        return found

    def wait_up(self, names: list[str], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                states = self.states()
            except OSError:
                states = {}
            if all(
                states.get(f"{backend}/{name}") == "UP"
                for name in names
                for backend in ("http_servers", "grpc_servers")
            ):
                return
            time.sleep(0.1)
        raise TimeoutError(f"HAProxy does not see {names} up: {self.states()}")

    def restart(self, member: Member, drain_s: float = 1.0) -> None:
        """Take the server out (drain), stop it, start it, wait until the balancer has it back."""
        for backend in ("http_servers", "grpc_servers"):
            self.admin(f"set server {backend}/{member.name} state drain")
        time.sleep(drain_s)
        assert member.server is not None
        assert member.server.stop() == 0
        self.start(member)
        member.server.wait_ready()
        for backend in ("http_servers", "grpc_servers"):
            self.admin(f"set server {backend}/{member.name} state ready")
        self.wait_up([member.name])

    def served_by(self, member: Member) -> int:
        """Requests the member's server has answered (its own statistics)."""
        connection = http.client.HTTPConnection("127.0.0.1", member.http_port, timeout=5)
        try:
            connection.request("GET", "/v2/models/simple/stats")
            stats = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])

    def stop(self) -> None:
        self.haproxy.terminate()
        self.haproxy.wait(10)
        for member in self.members:
            if member.server is not None:
                member.server.stop()


@dataclass
class Load:
    """Closed-loop HTTP and gRPC clients through the balancer, counting every outcome."""

    fleet: Fleet
    http_clients: int = 2
    grpc_clients: int = 2
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._http, daemon=True) for _ in range(self.http_clients)
        ] + [threading.Thread(target=self._grpc, daemon=True) for _ in range(self.grpc_clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _record(self, kind: str, started: float, error: str | None) -> None:
        with self._lock:
            self.latencies.append(time.perf_counter() - started)
            self.outcomes[f"{kind} {'ok' if error is None else 'failed'}"] += 1
            if error is not None:
                self.failures.append(f"{kind}: {error}")

    def _http(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.fleet.http_port, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            error = None
            try:
                connection.request("POST", "/v2/models/simple/infer", body=BODY)
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    error = f"{response.status} {payload[:200]!r}"
                elif json.loads(payload)["outputs"][0]["data"] != EXPECTED:
                    error = "wrong answer"
            except (OSError, http.client.HTTPException) as exc:
                error = repr(exc)
                connection.close()
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.fleet.http_port, timeout=30
                )
            self._record("http", started, error)
        connection.close()

    def _grpc(self) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.fleet.grpc_port}")
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        inputs = [
            grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
            grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        while not self._stop.is_set():
            started = time.perf_counter()
            error = None
            try:
                result = client.infer("simple", inputs, client_timeout=30)
                if result.as_numpy("OUTPUT0").tolist() != [EXPECTED]:
                    error = "wrong answer"
            except InferenceServerException as exc:
                error = f"{exc.status()} {exc.message()}"
            self._record("grpc", started, error)
        client.close()
