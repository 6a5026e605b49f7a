"""A real ``enginehouse serve`` in a child process on free loopback ports.

For tests and benchmarks (ours and users') of the process itself: start-up, signals, exit
codes, memory, gRPC worker processes. Everything else runs faster on
:class:`~enginehouse.testing.in_process.InProcessServer`, the same server without the
process around it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from enginehouse.testing.running import RunningServer, serve_arguments

SERVER_MODULES = (
    "enginehouse.cli",
    "enginehouse.frontends.http.app",
    "enginehouse.frontends.grpc.relay",
    "enginehouse.frontends.metrics",
    "onnxruntime",
)


def keep_bytecode(folder: Path, modules: tuple[str, ...] = SERVER_MODULES) -> None:
    """Let server processes started from here on write and reuse compiled bytecode, kept
    under ``folder``. Benchmarks of start times call it: a machine whose environment sets
    PYTHONDONTWRITEBYTECODE (the CI kind and the device image do) compiles every imported
    module from source on every start, a cost that an installed package or an image built
    with ``pip install`` (which writes .pyc files) does not pay. Then, so that the first
    start does not pay for writing them either, it imports ``modules`` once."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(folder))
    subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}"], check=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    All sockets stay bound until every port is chosen: closing each at once would let the
    kernel hand the same port out twice (HTTP and gRPC then collide)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ServerProcess(RunningServer):
    """``enginehouse serve`` over some repositories, its output kept in ``log_path``."""

    def _start(self) -> None:
        self._log: IO[bytes] | None = None
        self._restarts = 0
        self._launch()

    def _launch(self) -> None:
        chosen = iter(free_ports(3))
        self.http_port, self.grpc_port, self.metrics_port = (
            fixed or next(chosen) for fixed in self.fixed_ports
        )
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        args = [
            sys.executable,
            "-m",
            "enginehouse.cli",
            *serve_arguments(self.repositories, ports, self.extra),
        ]
        if self._log:
            self._log.close()
        self._log = open(self.log_path, "wb") if self.log_path else None
        output = self._log if self._log else subprocess.DEVNULL
        self.started = time.perf_counter()
        self.process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)

    @property
    def keeps_log(self) -> bool:
        return self.log_path is not None

    def log(self) -> str:
        if not self.log_path:
            return ""
        return self.log_path.read_text(errors="replace")

    def exited(self) -> bool:
        if self.process.poll() is None:
            return False
        # A free port can be taken by another process between choosing and binding.
        chosen = not any(self.fixed_ports)
        taken = "address already in use" in self.log().lower()
        if chosen and taken and self._restarts < 3:
            self._restarts += 1
            self._launch()
            return False
        return True

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait (kill after ``timeout_s``), and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log:
            self._log.close()
        return int(self.process.returncode)
