"""Keeping what loads leave behind out of the garbage collector's walks."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from enginehouse.runtime.memory import freeze_long_lived


class Node:
    """An object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_idle_freeze_reclaims_cycles_first_then_freezes_the_survivors() -> None:
    garbage = cycle()
    kept = Node()
    kept.other = kept
    freeze_long_lived(idle=True)
    assert garbage() is None  # the full collection came first
    assert gc.get_freeze_count() > 0
    assert not any(obj is kept for obj in gc.get_objects())  # frozen: no longer walked


def test_busy_freeze_leaves_old_cycles_to_the_next_idle_one() -> None:
    holder = [Node()]
    holder[0].other = holder[0]
    old = weakref.ref(holder[0])
    gc.collect()  # survivors move to the oldest generation
    holder.clear()  # now an old garbage cycle
    young = cycle()
    freeze_long_lived(idle=False)
    assert young() is None  # the young generations were collected
    assert old() is not None  # the oldest was not walked: no full-collection pause
    assert gc.get_freeze_count() > 0
    freeze_long_lived(idle=True)
    assert old() is None
