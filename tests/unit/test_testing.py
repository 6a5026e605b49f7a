"""ServerProcess retries when a port it chose was taken before the server bound it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from enginehouse import testing
from enginehouse.testing import process


@pytest.mark.parametrize("which", [0, 1], ids=["http", "grpc"])
def test_port_taken_between_choice_and_bind(
    which: int, monkeypatch: pytest.MonkeyPatch, example_repo: Path, tmp_path: Path
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real = process.free_ports
    ports = real(3)
    ports[which] = busy
    first = iter([ports])
    monkeypatch.setattr(process, "free_ports", lambda count: next(first, None) or real(count))
    server = testing.ServerProcess([example_repo], log_path=tmp_path / "log")
    try:
        server.wait_live()
        assert busy not in (server.http_port, server.grpc_port)
    finally:
        assert server.stop() == 0
        taken.close()


def test_ports_chosen_together_are_distinct() -> None:
    """HTTP, gRPC and metrics never get the same port (CI once saw HTTP and gRPC collide)."""
    for _ in range(200):
        ports = testing.free_ports(3)
        assert len(set(ports)) == 3
