"""What every test server offers, in a process or in this one: its addresses, waiting until
it is live or ready, its log, and stopping it."""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

Self = TypeVar("Self", bound="RunningServer")


def serve_arguments(
    repositories: list[Path], ports: tuple[int, int, int], extra: tuple[str, ...]
) -> list[str]:
    """``enginehouse serve``'s arguments for these repositories, (HTTP, gRPC, metrics) ports
    and further flags."""
    argv = ["serve"]
    for repository in repositories:
        argv += ["--model-repository", str(repository)]
    http, grpc, metrics = ports
    return [
        *argv,
        *("--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)),
        *extra,
    ]


class RunningServer(ABC):
    """A server on loopback ports, started as it is made: ``enginehouse serve`` over
    ``repositories`` with the flags ``extra``; a port of 0 is one chosen for it. Readiness
    is polled over plain HTTP, so that no client library is needed to wait for it."""

    http_port: int
    grpc_port: int
    metrics_port: int

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
        self.repositories = repositories
        self.extra = extra
        self.log_path = log_path
        self.fixed_ports = (http_port, grpc_port, metrics_port)
        # How to reach a server whose HTTP endpoint speaks TLS (None: plain HTTP).
        self.https = https
        self._start()

    @abstractmethod
    def _start(self) -> None:
        """Start the server (the constructor's last step)."""

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def keeps_log(self) -> bool:
        """Whether :meth:`log` returns what the server logs (a process keeps it only when
        given a ``log_path``)."""
        return True

    @abstractmethod
    def log(self) -> str:
        """Everything the server logged so far."""

    @abstractmethod
    def exited(self) -> bool:
        """Whether the server has stopped on its own (and will not come back)."""

    @abstractmethod
    def stop(self, timeout_s: float = 60.0) -> int:
        """Drain and stop; the exit code (0: a clean stop)."""

    def _get(self, path: str) -> int:
        # A short timeout: a port that someone else holds (the server lost the race for it and
        # is restarting on another) accepts the connection and never answers, or answers in
        # another protocol (another test's gRPC server: not an HTTP status line).
        try:
            scheme = "https" if self.https else "http"
            url = f"{scheme}://{self.http_url}{path}"
            with urllib.request.urlopen(url, timeout=1, context=self.https) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, http.client.HTTPException):
            return 0

    def wait_live(self, timeout_s: float = 120.0, ready_log: bool = True) -> None:
        """Until the HTTP endpoint answers (and, by default, start-up loading finished)."""
        self._wait(
            timeout_s,
            lambda: (
                self._get("/v2/health/live") == 200
                and (not ready_log or not self.keeps_log or "server ready" in self.log())
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

    def _wait(self, timeout_s: float, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.exited():
                raise RuntimeError(f"server exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start:\n{self.log()}")
            time.sleep(0.01)

    @classmethod
    @contextmanager
    def live(
        cls: type[Self], repositories: list[Path], *extra: str, **options: Any
    ) -> Iterator[Self]:
        """A server started and live (start-up loading done) for the ``with`` block, stopped
        after it: the shape of every test fixture that needs one."""
        server = cls(repositories, *extra, **options)
        try:
            server.wait_live()
            yield server
        finally:
            server.stop()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
