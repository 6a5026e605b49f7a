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


def test_a_port_that_answers_another_protocol_is_not_live_yet() -> None:
    """A chosen port that another test's gRPC server took answers with HTTP/2 frames: the
    live probe reads that as not live (the server then restarts on another port)."""
    import threading

    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()

    def answer_in_http2() -> None:
        conn, _ = other.accept()
        conn.recv(1024)
        conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x10\x00")
        conn.close()

    thread = threading.Thread(target=answer_in_http2)
    thread.start()
    probe = testing.ServerProcess.__new__(testing.ServerProcess)
    probe.https = None
    probe.http_port = other.getsockname()[1]
    try:
        assert probe._get("/v2/health/live") == 0
    finally:
        thread.join()
        other.close()
