"""ServerProcess retries when a port it chose was taken before the server bound it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from enginehouse import testing


def test_port_taken_between_choice_and_bind(
    monkeypatch: pytest.MonkeyPatch, example_repo: Path, tmp_path: Path
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real = testing.free_port
    calls = iter([busy, real(), real()])
    monkeypatch.setattr(testing, "free_port", lambda: next(calls, None) or real())
    server = testing.ServerProcess([example_repo], log_path=tmp_path / "log")
    try:
        server.wait_live()
        assert server.http_port != busy
    finally:
        assert server.stop() == 0
        taken.close()
