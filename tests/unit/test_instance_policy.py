from __future__ import annotations

import pytest

from enginehouse.runtime.instance import InlinePolicy


def test_first_run_is_threaded_and_seeds_the_average() -> None:
    policy = InlinePolicy(threshold_ns=100_000)
    assert not policy.inline(16)
    policy.observe(20_000, inline=False)
    assert policy.inline(16)
    assert not policy.inline(10**6), "large inputs never run on the event loop"


def test_one_preempted_run_does_not_flip_the_mode() -> None:
    policy = InlinePolicy(threshold_ns=100_000)
    policy.observe(20_000, inline=False)
    policy.observe(5_000_000, inline=True)
    assert policy.inline(16)


def test_a_slow_model_goes_to_its_thread_and_probes_back() -> None:
    policy = InlinePolicy(threshold_ns=100_000, probe_every=8)
    policy.observe(20_000, inline=False)
    runs = 0
    while policy.inline(16):
        policy.observe(1_000_000, inline=True)
        runs += 1
    assert runs < 20
    decisions = [policy.inline(16) for _ in range(16)]
    assert decisions.count(True) == 2


def test_fixed_modes() -> None:
    assert InlinePolicy("always").inline(10**9)
    never = InlinePolicy("never")
    never.observe(1, inline=True)
    assert not never.inline(1)
    with pytest.raises(ValueError):
        InlinePolicy("sometimes")
