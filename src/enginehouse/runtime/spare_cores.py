"""How many of the machine's cores sat idle lately: whether another thread gets a core of its
own or has to take turns with the ones already running.

Handing a model's execution to its instance's thread runs it beside the event loop only
where a core is free for that thread. Where every core is busy (a small machine, or clients
on the same one), the thread waits for a turn and every hand-off costs context switches on
both sides, more than a short execution does (runtime/instance.py's inline policy weighs
this). The idle time comes from /proc/stat, read at most once per ``interval_s``, so asking
costs a clock read almost always. Where /proc/stat cannot be read, the answer is that cores
are to spare: what the policy does without this.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

INTERVAL_S = 0.5


def _idle_and_total(text: str) -> tuple[int, int]:
    """Idle and total clock ticks of all cores from /proc/stat's first line (idle counts
    the ticks waiting for I/O too)."""
    fields = text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("no cpu line")
    ticks = [int(value) for value in fields[1:]]
    return ticks[3] + (ticks[4] if len(ticks) > 4 else 0), sum(ticks[:8])


class SpareCores:
    """Callable: the cores idle on average over the last completed interval (``inf`` until
    two readings exist, or where /proc/stat is unreadable)."""

    def __init__(
        self,
        path: str = "/proc/stat",
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        cores: int | None = None,
    ) -> None:
        self._path = path
        self._interval_s = interval_s
        self._clock = clock
        self._cores = cores or os.cpu_count() or 1
        self._due = -math.inf
        self._last: tuple[int, int] | None = None
        self._spare = math.inf

    def __call__(self) -> float:
        now = self._clock()
        if now < self._due:
            return self._spare
        self._due = now + self._interval_s
        try:
            with open(self._path) as stat:
                reading = _idle_and_total(stat.read(512))
        except (OSError, ValueError, IndexError):
            self._last = None
            self._spare = math.inf
            return self._spare
        last, self._last = self._last, reading
        if last is not None and reading[1] > last[1]:
            idle = (reading[0] - last[0]) / (reading[1] - last[1])
            self._spare = idle * self._cores
        return self._spare


# One reading for the whole process: every instance's policy asks the same question.
spare_cores = SpareCores()
