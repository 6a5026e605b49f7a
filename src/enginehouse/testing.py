"""A real ``enginehouse serve`` in a child process on free loopback ports.

For tests and benchmarks (ours and users'): the server is the command a user runs, not an
in-process stand-in. Readiness is polled over plain HTTP so that this module needs no
client library.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

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
        https: ssl.SSLContext | None = None,
    ) -> None:
        # How to reach a server whose HTTP endpoint speaks TLS (None: plain HTTP).
        self.https = https
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self._repositories = repositories
        self._extra = extra
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self._restarts = 0
        self._launch()

    def _launch(self) -> None:
        chosen = iter(free_ports(3))
        self.http_port, self.grpc_port, self.metrics_port = (
            fixed or next(chosen) for fixed in self._fixed_ports
        )
        args = [sys.executable, "-m", "enginehouse.cli", "serve"]
        for repository in self._repositories:
            args += ["--model-repository", str(repository)]
        args += [
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            *self._extra,
        ]
        if self._log:
            self._log.close()
        self._log = open(self.log_path, "wb") if self.log_path else None
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
            scheme = "https" if self.https else "http"
            url = f"{scheme}://{self.http_url}{path}"
            with urllib.request.urlopen(url, timeout=5, context=self.https) as r:
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

    def wait_ready(self, timeout_s: float = 120.0, fail_fast: bool = False) -> None:
        """Until ``/v2/health/ready`` answers 200. With ``fail_fast``, raise as soon as the
        log says that start-up loading failed (rather than waiting for a later load)."""

        def ready() -> bool:
            if self._get("/v2/health/ready") == 200:
                return True
            if fail_fast and "server ready: no" in self.log():
                raise RuntimeError(f"a model failed to load at start-up:\n{self.log()}")
            return False

        self._wait(timeout_s, ready)

    def _wait(self, timeout_s: float, done) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.process.poll() is not None:
                # A free port can be taken by another process between choosing and binding.
                chosen = not any(self._fixed_ports)
                taken = "address already in use" in self.log().lower()
                if chosen and taken and self._restarts < 3:
                    self._restarts += 1
                    self._launch()
                    continue
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

    @classmethod
    @contextmanager
    def live(cls, repositories: list[Path], *extra: str, **options: Any) -> Iterator[ServerProcess]:
        """A server started and live (start-up loading done) for the ``with`` block, stopped
        after it: the shape of every test fixture that needs one."""
        server = cls(repositories, *extra, **options)
        try:
            server.wait_live()
            yield server
        finally:
            server.stop()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
