"""Every test in tests/gpu carries the ``gpu`` marker: ``pytest -m gpu`` runs just them on a
machine with an NVIDIA GPU, ``-m "not gpu"`` leaves them out (they skip without one anyway)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in item.nodeid:
            item.add_marker(pytest.mark.gpu)
