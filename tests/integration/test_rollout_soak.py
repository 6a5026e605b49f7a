"""Soak: 20 rollouts (10 by polling, 10 by the repository API) under 32 client threads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rollout import soak


@pytest.mark.parametrize("mode", ["poll", "api"])
def test_rollouts_under_load_lose_nothing(tmp_path: Path, mode: str) -> None:
    result = soak(tmp_path, mode, rollouts=10, threads=32, warmup=1000, rest_s=3.0)
    print(
        f"{mode}: {result.requests} requests, p99 at rest {result.p99_rest_ms:.1f} ms, "
        f"during rollouts {result.p99_rollout_ms:.1f} ms ({result.p99_ratio:.2f}x); "
        f"rollouts took {min(result.rollout_s):.2f}-{max(result.rollout_s):.2f} s"
    )
    assert result.requests > 1000
    assert result.problems == [], result.problems[:10]
