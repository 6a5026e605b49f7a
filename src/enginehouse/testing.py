"""A real ``enginehouse serve`` in a child process on free loopback ports.

For tests and benchmarks (ours and users'): the server is the command a user runs, not an
in-process stand-in. Readiness is polled over plain HTTP so that this module needs no
client library.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``enginehouse serve`` over some repositories, its output kept in ``log_path``."""

    def __init__(
        self,
        repositories: list[Path],
        *extra: str,
        log_path: Path | None = None,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
    ) -> None:
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = log_path
        args = [sys.executable, "-m", "enginehouse.cli", "serve"]
        for repository in repositories:
            args += ["--model-repository", str(repository)]
        args += [
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            *extra,
        ]
        self._log = open(log_path, "wb") if log_path else None
        output = self._log if self._log else subprocess.DEVNULL
        self.started = time.perf_counter()
        self.process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def wait_live(self, timeout_s: float = 120.0, ready_log: bool = True) -> None:
        """Until the HTTP endpoint answers (and, by default, start-up loading finished)."""
        self._wait(
            timeout_s,
            lambda: (
                self._get("/v2/health/live") == 200
                and (not ready_log or "server ready" in self.log() or not self.log_path)
            ),
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until ``/v2/health/ready`` answers 200."""
        self._wait(timeout_s, lambda: self._get("/v2/health/ready") == 200)

    def _wait(self, timeout_s: float, done) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start:\n{self.log()}")
            time.sleep(0.02)

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

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
