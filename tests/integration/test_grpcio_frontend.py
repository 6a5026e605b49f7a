"""The protocol tests once more on grpcio's asyncio server (``--grpc-frontend grpcio``): the
inference, error and shared-memory tests run here unchanged (their HTTP cases run again
alongside: they share the server), so that both in-process gRPC frontends stay proven."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import InProcessServer
from tests.integration.test_errors import *  # noqa: F403
from tests.integration.test_inference import *  # noqa: F403
from tests.integration.test_shared_memory import *  # noqa: F403


@pytest.fixture(scope="module")
def server(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """The example repository behind grpcio's server (overrides the shared fixture)."""
    with InProcessServer.live(
        [example_repo],
        "--grpc-frontend",
        "grpcio",
        log_path=tmp_path_factory.mktemp("log") / "grpcio.log",
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def served(server: InProcessServer) -> InProcessServer:
    """The shared-memory tests' server: the same one."""
    return server
