"""The dynamic batcher's queue and batching policy, as pure logic over a given clock.

Triton's ``dynamic_batching`` semantics: requests wait in priority levels (1 is the most
urgent), first come first served within a level, each level with its queue policy (maximum
size, default timeout, whether a request may shorten it, and REJECT or DELAY when it
expires). A batch is formed from the front of the queue while requests share the shapes of
their non-batch dimensions; it goes out at once when it reaches the maximum batch size or a
preferred size, otherwise when its oldest request has waited ``max_queue_delay``. Nothing
here awaits or reads a clock: the caller passes ``now`` (ns), so tests are exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.errors import InvalidArgumentError, UnavailableError

T = TypeVar("T")

REJECT = mc.ModelQueuePolicy.REJECT
DELAY = mc.ModelQueuePolicy.DELAY


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """One priority level's queue policy (Triton's ModelQueuePolicy)."""

    max_queue_size: int = 0  # 0: unbounded
    default_timeout_ns: int = 0  # 0: never
    allow_timeout_override: bool = False
    timeout_action: int = REJECT

    @classmethod
    def from_config(cls, policy: mc.ModelQueuePolicy) -> QueuePolicy:
        return cls(
            max_queue_size=policy.max_queue_size,
            default_timeout_ns=policy.default_timeout_microseconds * 1000,
            allow_timeout_override=policy.allow_timeout_override,
            timeout_action=policy.timeout_action,
        )


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """What a model's ``dynamic_batching`` block says, in nanoseconds."""

    max_batch_size: int
    preferred_sizes: tuple[int, ...] = ()
    max_queue_delay_ns: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority: int = 0
    default_policy: QueuePolicy = QueuePolicy()
    level_policies: dict[int, QueuePolicy] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> BatchingPolicy:
        batching = config.dynamic_batching
        default_policy = QueuePolicy.from_config(batching.default_queue_policy)
        levels = {
            level: QueuePolicy.from_config(policy)
            for level, policy in batching.priority_queue_policy.items()
        }
        return cls(
            max_batch_size=config.max_batch_size,
            preferred_sizes=tuple(sorted(set(batching.preferred_batch_size))),
            max_queue_delay_ns=batching.max_queue_delay_microseconds * 1000,
            preserve_ordering=batching.preserve_ordering,
            priority_levels=batching.priority_levels,
            default_priority=batching.default_priority_level,
            default_policy=default_policy,
            level_policies=levels,
        )

    def levels(self) -> list[int]:
        """Priority levels, most urgent first (a single level 0 without priorities)."""
        return list(range(1, self.priority_levels + 1)) if self.priority_levels else [0]

    def level_for(self, requested: int) -> int:
        """The level of a request's ``priority`` (0 means the default level)."""
        if not self.priority_levels:
            return 0
        if requested == 0:
            return self.default_priority or self.priority_levels
        if not 1 <= requested <= self.priority_levels:
            raise InvalidArgumentError(
                f"priority {requested} is outside the model's levels 1..{self.priority_levels}"
            )
        return requested

    def policy_for(self, level: int) -> QueuePolicy:
        return self.level_policies.get(level, self.default_policy)


@dataclass(slots=True)
class Pending(Generic[T]):
    """A request waiting in the queue: its batch size, shape key and deadline."""

    item: T
    batch_size: int
    shape_key: Hashable
    arrival_ns: int
    deadline_ns: int  # 0: none
    timeout_action: int
    level: int


@dataclass(slots=True)
class Decision(Generic[T]):
    """What the queue says now: a batch to run, requests that expired, when to look again."""

    batch: list[Pending[T]]
    expired: list[Pending[T]]
    wake_at_ns: int  # 0: nothing to wait for


class BatchQueue(Generic[T]):
    """Pending requests by priority level, and the batching decision over them."""

    def __init__(self, policy: BatchingPolicy) -> None:
        self.policy = policy
        self._levels: dict[int, deque[Pending[T]]] = {lvl: deque() for lvl in policy.levels()}
        self._delayed: deque[Pending[T]] = deque()
        self._order = [self._levels[lvl] for lvl in policy.levels()]
        self.size = 0

    def admit(
        self,
        item: T,
        batch_size: int,
        shape_key: Hashable,
        now_ns: int,
        priority: int = 0,
        timeout_us: int = 0,
    ) -> Pending[T]:
        """Queue a request, or raise UnavailableError when its level is full."""
        level = self.policy.level_for(priority)
        queue_policy = self.policy.policy_for(level)
        waiting = self._levels[level]
        if queue_policy.max_queue_size and len(waiting) >= queue_policy.max_queue_size:
            raise UnavailableError(
                f"exceeds maximum queue size {queue_policy.max_queue_size} (priority level {level})"
            )
        timeout_ns = queue_policy.default_timeout_ns
        if timeout_us > 0:
            requested = timeout_us * 1000
            if queue_policy.allow_timeout_override or not timeout_ns:
                timeout_ns = requested if not timeout_ns else min(timeout_ns, requested)
        pending = Pending(
            item,
            batch_size,
            shape_key,
            now_ns,
            now_ns + timeout_ns if timeout_ns else 0,
            queue_policy.timeout_action,
            level,
        )
        waiting.append(pending)
        self.size += 1
        return pending

    def _expire(self, now_ns: int) -> list[Pending[T]]:
        """Take out REJECT requests past their deadline; move DELAY ones behind the rest."""
        expired: list[Pending[T]] = []
        for waiting in self._order:
            if not any(p.deadline_ns and p.deadline_ns <= now_ns for p in waiting):
                continue
            keep: list[Pending[T]] = []
            for pending in waiting:
                if not pending.deadline_ns or pending.deadline_ns > now_ns:
                    keep.append(pending)
                elif pending.timeout_action == DELAY:
                    pending.deadline_ns = 0
                    self._delayed.append(pending)
                else:
                    expired.append(pending)
                    self.size -= 1
            waiting.clear()
            waiting.extend(keep)
        return expired

    def pending(self) -> Iterable[Pending[T]]:
        """Every queued request, most urgent first."""
        return self._front()

    def expire(self, now_ns: int) -> list[Pending[T]]:
        """Requests that timed out with REJECT, taken out of the queue."""
        return self._expire(now_ns)

    def _front(self) -> Iterable[Pending[T]]:
        for waiting in self._order:
            yield from waiting
        yield from self._delayed

    def next(self, now_ns: int) -> Decision[T]:
        """The batch to run now (possibly empty), what expired, and when to decide again."""
        expired = self._expire(now_ns)
        policy = self.policy
        candidates: list[Pending[T]] = []
        total = 0
        first: Pending[T] | None = None
        for pending in self._front():
            if first is None:
                first = pending
            elif pending.shape_key != first.shape_key:
                break
            if total + pending.batch_size > policy.max_batch_size:
                break
            candidates.append(pending)
            total += pending.batch_size
        if first is None:
            return Decision([], expired, 0)
        take = 0
        if total >= policy.max_batch_size or len(candidates) < self.size:
            take = len(candidates)  # full, or blocked by a request that cannot join
        else:
            preferred = [s for s in policy.preferred_sizes if s <= total]
            if preferred:
                take = self._count_for(candidates, preferred[-1])
            elif now_ns - min(p.arrival_ns for p in candidates) >= policy.max_queue_delay_ns:
                take = len(candidates)
        if take == 0:
            wake = min(p.arrival_ns for p in candidates) + policy.max_queue_delay_ns
            deadlines = [p.deadline_ns for p in self._front() if p.deadline_ns]
            if deadlines:
                wake = min(wake, *deadlines)
            return Decision([], expired, wake)
        batch = candidates[:take]
        self._remove(batch)
        return Decision(batch, expired, 0)

    @staticmethod
    def _count_for(candidates: list[Pending[T]], size: int) -> int:
        total = 0
        for count, pending in enumerate(candidates, start=1):
            total += pending.batch_size
            if total >= size:
                return count
        return len(candidates)

    def _remove(self, batch: list[Pending[T]]) -> None:
        chosen = {id(p) for p in batch}
        for waiting in (*self._order, self._delayed):
            while waiting and id(waiting[0]) in chosen:
                waiting.popleft()
                self.size -= 1
        if any(id(p) in chosen for w in (*self._order, self._delayed) for p in w):
            for waiting in (*self._order, self._delayed):
                kept = [p for p in waiting if id(p) not in chosen]
                self.size -= len(waiting) - len(kept)
                waiting.clear()
                waiting.extend(kept)

    def drain(self) -> list[Pending[T]]:
        """Everything still queued (shutdown of a version)."""
        items = list(self._front())
        for waiting in (*self._order, self._delayed):
            waiting.clear()
        self.size = 0
        return items
