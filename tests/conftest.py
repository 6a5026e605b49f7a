"""Shared fixtures: example repositories on disk and real servers on loopback ports, in this
process (the default) or in a child process (tests of the process itself)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_repository import make_repository  # noqa: E402

from enginehouse.testing import (  # noqa: E402
    InProcessServer,
    ServerProcess,
    fake_backend,
    free_port,
)

__all__ = ["InProcessServer", "ServerProcess", "free_port"]

# Inductor checks each vector instruction set it may use by compiling and loading a probe
# in a child Python (6 s of CPU per process that builds a PyTorch engine, on every test
# worker and child server); these machines' compiler supports what their CPU reports, so
# the tests take the CPU's word for it. Servers that users run keep the probe.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
fake_backend.install()
# The servers run on threads of this process beside the clients: hand the GIL over sooner
# than every 5 ms, as separate processes would not have to.
sys.setswitchinterval(0.0005)


@pytest.fixture(autouse=True)
def _fresh_fake_controls() -> Iterator[None]:
    yield
    fake_backend.reset()


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples/ repository, written once per test session."""
    return make_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """A server in the default control mode (none) over the example repository."""
    proc = InProcessServer([example_repo], log_path=tmp_path_factory.mktemp("log") / "server.log")
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
def explicit_server(explicit_repo: Path, tmp_path: Path) -> Iterator[InProcessServer]:
    """A server in explicit mode that starts with only ``simple`` loaded."""
    with InProcessServer.live(
        [explicit_repo],
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        log_path=tmp_path / "explicit.log",
    ) as proc:
        yield proc


os.environ.setdefault("PYTHONUNBUFFERED", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests (engine builds) first: spread over pytest-xdist's workers, a long test
    that starts last would keep one worker busy after the others have finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
