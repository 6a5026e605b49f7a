from __future__ import annotations

import pytest

from enginehouse.runtime.instance import InlinePolicy


def test_first_run_is_threaded_and_seeds_the_average() -> None:
    policy = InlinePolicy(threshold_ns=100_000)
    assert not policy.inline(16)
    policy.observe(20_000, inline=False, input_bytes=64)
    assert policy.inline(16)
    assert policy.inline(64)
    # Four times the data measured: judged at four times the time, still under 100 us.
    assert policy.inline(4 * 64)
    assert not policy.inline(10**6), "a much larger request is judged slow, not run inline"


def test_large_tensors_run_inline_where_the_model_is_fast_on_them() -> None:
    policy = InlinePolicy(threshold_ns=100_000)
    policy.seed(40_000, input_bytes=1 << 20)  # a 1 MB identity, measured at warm-up
    assert policy.inline(1 << 20)
    assert not policy.inline(64 << 20)
    for _ in range(100):
        policy.observe(30_000, inline=True, input_bytes=1 << 20)
    assert policy.inline(1 << 20)


def test_smaller_batches_than_the_largest_measured_are_judged_by_the_average() -> None:
    policy = InlinePolicy(threshold_ns=100_000)
    for rows in (1, 2, 4, 8, 16, 32, 64):  # warm-up: every batch size the batcher forms
        policy.observe(15_000, inline=True, input_bytes=128 * rows)
    policy.seed(14_000, input_bytes=128)
    assert policy.inline(128 * 64)
    assert not policy.inline(128 * 64 * 16)


def test_a_request_larger_than_those_measured_is_never_a_probe() -> None:
    policy = InlinePolicy(threshold_ns=100_000, probe_every=2)
    policy.seed(150_000, input_bytes=1024)
    assert [policy.inline(4096) for _ in range(8)] == [False] * 8
    assert [policy.inline(1024) for _ in range(4)].count(True) == 2


def test_one_preempted_run_does_not_flip_the_mode() -> None:
    policy = InlinePolicy(threshold_ns=100_000)
    policy.observe(20_000, inline=False, input_bytes=64)
    policy.observe(5_000_000, inline=True, input_bytes=64)
    assert policy.inline(16)


def test_a_slow_model_goes_to_its_thread_and_probes_back() -> None:
    policy = InlinePolicy(threshold_ns=100_000, probe_every=8)
    policy.observe(20_000, inline=False, input_bytes=64)
    runs = 0
    while policy.inline(16):
        policy.observe(1_000_000, inline=True, input_bytes=64)
        runs += 1
    assert runs < 20
    decisions = [policy.inline(16) for _ in range(16)]
    assert decisions.count(True) == 2


def test_fixed_modes() -> None:
    assert InlinePolicy("always").inline(10**9)
    never = InlinePolicy("never")
    never.observe(1, inline=True, input_bytes=1)
    assert not never.inline(1)
    with pytest.raises(ValueError):
        InlinePolicy("sometimes")


def test_a_model_faster_than_its_hand_off_runs_inline() -> None:
    """Over the threshold but under what handing it to the thread costs: on the loop."""
    policy = InlinePolicy(threshold_ns=100_000, probe_every=8, spare=lambda: 0.0)
    policy.seed(215_000, input_bytes=1 << 20)  # a 1 MB identity on a slow machine
    assert not policy.inline(1 << 20)
    for _ in range(30):
        policy.observe_handoff(600_000)
    assert policy.limit_ns > 500_000
    decisions = [policy.inline(1 << 20) for _ in range(16)]
    assert decisions.count(True) == 14, "inline, but every 8th goes to the thread to re-measure"


def test_the_hand_off_allowance_is_capped() -> None:
    """However much hand-offs cost, a model slower than ten times the threshold stays on
    its thread (and probes back as before)."""
    policy = InlinePolicy(threshold_ns=100_000, probe_every=8, spare=lambda: 0.0)
    policy.seed(180_000, input_bytes=64)
    for _ in range(50):
        policy.observe_handoff(50_000_000)
    assert policy.limit_ns == pytest.approx(1_000_000)
    runs = 0
    for _ in range(100):
        if policy.inline(64):
            policy.observe(3_000_000, inline=True, input_bytes=64)
            runs += 1
        if (policy.average_ns or 0) >= policy.limit_ns:
            break
    assert runs < 40, "a 3 ms model leaves the loop within a few dozen runs"
    assert [policy.inline(64) for _ in range(16)].count(True) == 2


def test_cheap_hand_offs_send_such_a_model_back_to_its_thread() -> None:
    policy = InlinePolicy(threshold_ns=100_000, probe_every=4, spare=lambda: 0.0)
    policy.seed(300_000, input_bytes=64)
    policy.observe_handoff(900_000)
    assert policy.inline(64)
    for _ in range(60):  # the machine got quieter: hand-offs measured at 40 us
        policy.observe_handoff(40_000)
    assert policy.limit_ns < 110_000
    assert [policy.inline(64) for _ in range(8)].count(True) == 2  # the usual probes only


def test_with_a_core_to_spare_the_threshold_holds() -> None:
    """Hand-offs however slow: where a core is idle the thread runs beside the loop, so a
    model over the threshold stays there (instances keep computing in parallel)."""
    spare = [3.0]
    policy = InlinePolicy(threshold_ns=100_000, probe_every=8, spare=lambda: spare[0])
    policy.seed(215_000, input_bytes=64)
    for _ in range(30):
        policy.observe_handoff(600_000)
    assert [policy.inline(64) for _ in range(16)].count(True) == 2  # the usual probes only
    spare[0] = 0.2
    assert [policy.inline(64) for _ in range(16)].count(True) == 14


def test_a_slow_model_is_never_taken_for_one_within_the_allowance() -> None:
    """A warm-up measuring tens of milliseconds keeps the model on its thread however much
    hand-offs cost (its time is not clipped down into the allowance)."""
    for first in ("seed", "observe"):
        policy = InlinePolicy(threshold_ns=100_000, probe_every=8, spare=lambda: 0.0)
        if first == "seed":
            policy.seed(20_000_000, input_bytes=64)
        else:
            policy.observe(20_000_000, inline=False, input_bytes=64)
        for _ in range(30):
            policy.observe_handoff(5_000_000)
        assert [policy.inline(64) for _ in range(16)].count(True) == 2, first
