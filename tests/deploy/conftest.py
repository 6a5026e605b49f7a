"""The deployment proofs: the image, the Kubernetes bundle, Prometheus rules and dashboard, a
balanced fleet. Marked ``deploy`` and left out of the default run (they need buildah,
mmdebstrap, prometheus and haproxy from Debian, and the validators of the ``deploy`` extra);
``bash scripts/test-deploy.sh`` installs those and runs them, as CI does."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/deploy/" in item.nodeid:
            item.add_marker(pytest.mark.deploy)


def tool(name: str) -> str:
    """The path of a command the test needs (the virtual environment's first); a missing one
    fails: the deploy run installs it."""
    local = Path(sys.executable).parent / name
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run bash scripts/test-deploy.sh, which installs it")
    return path
