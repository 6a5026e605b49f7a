"""The batching policy as pure logic, on a clock the test holds."""

from __future__ import annotations

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.errors import InvalidArgumentError, UnavailableError
from enginehouse.scheduler.queue import BatchingPolicy, BatchQueue, QueuePolicy

US = 1000


def queue(**kwargs: object) -> BatchQueue[str]:
    fields = {"max_batch_size": 8, "max_queue_delay_ns": 100 * US}
    fields.update(kwargs)
    return BatchQueue(BatchingPolicy(**fields))  # type: ignore[arg-type]


def names(decision) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.item for p in decision.batch]


def test_waits_for_the_delay_then_sends_what_it_has() -> None:
    q = queue()
    q.admit("a", 1, "k", now_ns=0)
    q.admit("b", 2, "k", now_ns=10 * US)
    early = q.next(50 * US)
    assert early.batch == [] and early.wake_at_ns == 100 * US
    assert names(q.next(100 * US)) == ["a", "b"]
    assert q.size == 0


def test_full_batch_goes_at_once() -> None:
    q = queue()
    for i in range(4):
        q.admit(f"r{i}", 2, "k", now_ns=0)
    assert names(q.next(1)) == ["r0", "r1", "r2", "r3"]


def test_batch_never_exceeds_max() -> None:
    q = queue()
    q.admit("a", 5, "k", now_ns=0)
    q.admit("b", 5, "k", now_ns=0)
    assert names(q.next(0)) == ["a"], "b cannot join, so a goes now"
    assert names(q.next(100 * US)) == ["b"]


def test_preferred_size_goes_at_once() -> None:
    q = queue(preferred_sizes=(4,))
    for i in range(3):
        q.admit(f"r{i}", 1, "k", now_ns=0)
    assert q.next(0).batch == []
    q.admit("r3", 1, "k", now_ns=0)
    q.admit("r4", 1, "k", now_ns=0)
    assert names(q.next(0)) == ["r0", "r1", "r2", "r3"]


def test_different_shapes_do_not_merge() -> None:
    q = queue()
    q.admit("a", 1, ("x", (3,)), now_ns=0)
    q.admit("b", 1, ("x", (4,)), now_ns=0)
    q.admit("c", 1, ("x", (3,)), now_ns=0)
    assert names(q.next(0)) == ["a"]
    assert names(q.next(0)) == ["b"]
    assert names(q.next(200 * US)) == ["c"]


def test_priorities_go_first() -> None:
    q = queue(priority_levels=2, default_priority=2, max_queue_delay_ns=0)
    q.admit("low", 1, "k", now_ns=0)
    q.admit("high", 1, "k", now_ns=1, priority=1)
    assert names(q.next(2)) == ["high", "low"]
    with pytest.raises(InvalidArgumentError):
        q.admit("bad", 1, "k", now_ns=0, priority=3)


def test_queue_full_is_unavailable() -> None:
    q = queue(default_policy=QueuePolicy(max_queue_size=2))
    q.admit("a", 1, "k", now_ns=0)
    q.admit("b", 1, "k", now_ns=0)
    with pytest.raises(UnavailableError, match="maximum queue size"):
        q.admit("c", 1, "k", now_ns=0)


def test_timeouts_reject_or_delay() -> None:
    q = queue(default_policy=QueuePolicy(default_timeout_ns=50 * US), max_queue_delay_ns=10**9)
    q.admit("a", 1, "k", now_ns=0)
    decision = q.next(60 * US)
    assert [p.item for p in decision.expired] == ["a"] and q.size == 0

    delayed = queue(
        default_policy=QueuePolicy(
            default_timeout_ns=50 * US, timeout_action=mc.ModelQueuePolicy.DELAY
        ),
        max_queue_delay_ns=10**9,
    )
    delayed.admit("late", 1, "k", now_ns=0)
    delayed.admit("fresh", 1, "k", now_ns=55 * US)
    decision = delayed.next(60 * US)
    assert decision.expired == [] and delayed.size == 2
    assert [p.item for p in delayed.pending()] == ["fresh", "late"]


def test_timeout_override_only_shortens_when_allowed() -> None:
    allowed = queue(
        default_policy=QueuePolicy(default_timeout_ns=100 * US, allow_timeout_override=True)
    )
    assert allowed.admit("a", 1, "k", now_ns=0, timeout_us=20).deadline_ns == 20 * US
    assert allowed.admit("b", 1, "k", now_ns=0, timeout_us=500).deadline_ns == 100 * US
    fixed = queue(default_policy=QueuePolicy(default_timeout_ns=100 * US))
    assert fixed.admit("c", 1, "k", now_ns=0, timeout_us=20).deadline_ns == 100 * US
    open_ended = queue()
    assert open_ended.admit("d", 1, "k", now_ns=0, timeout_us=20).deadline_ns == 20 * US
    assert open_ended.admit("e", 1, "k", now_ns=0).deadline_ns == 0


def test_wake_at_the_earliest_deadline() -> None:
    q = queue(default_policy=QueuePolicy(default_timeout_ns=30 * US))
    q.admit("a", 1, "k", now_ns=0)
    assert q.next(1).wake_at_ns == 30 * US


def test_from_config() -> None:
    config = mc.ModelConfig(max_batch_size=16)
    config.dynamic_batching.preferred_batch_size.extend([8, 4])
    config.dynamic_batching.max_queue_delay_microseconds = 250
    config.dynamic_batching.priority_levels = 3
    config.dynamic_batching.default_priority_level = 2
    config.dynamic_batching.priority_queue_policy[1].max_queue_size = 5
    policy = BatchingPolicy.from_config(config)
    assert policy.preferred_sizes == (4, 8)
    assert policy.max_queue_delay_ns == 250 * US
    assert policy.policy_for(1).max_queue_size == 5
    assert policy.policy_for(2).max_queue_size == 0
    assert policy.level_for(0) == 2
