"""Shared fixtures: example repositories on disk and real servers on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_repository import make_repository  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``enginehouse serve`` in a child process, on free ports, with its log kept."""

    def __init__(self, repositories: list[Path], *extra: str, log_path: Path) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
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
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_live(self, timeout_s: float = 60.0, ready_log: bool = True) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout_s
        client = httpclient.InferenceServerClient(self.http_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if client.is_server_live() and (not ready_log or "server ready" in self.log()):
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server did not start:\n{self.log()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples/ repository, written once per test session."""
    return make_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server in the default control mode (none) over the example repository."""
    proc = ServerProcess([example_repo], log_path=tmp_path_factory.mktemp("log") / "server.log")
    try:
        proc.wait_live()
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def explicit_repo(example_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of part of the example repository, for load/unload tests."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("simple", "identity_fp32", "convnet"):
        shutil.copytree(example_repo / name, root / name)
    return root


@pytest.fixture()
def explicit_server(explicit_repo: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server in explicit mode that starts with only ``simple`` loaded."""
    proc = ServerProcess(
        [explicit_repo],
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        log_path=tmp_path / "explicit.log",
    )
    try:
        proc.wait_live()
        yield proc
    finally:
        proc.stop()


os.environ.setdefault("PYTHONUNBUFFERED", "1")
