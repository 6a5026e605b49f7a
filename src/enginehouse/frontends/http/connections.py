"""The open connections of an HTTP listener and the limits that keep them from piling up.

A client that opens connections and never finishes a request (slowloris), that sends
megabytes of headers, or that keeps idle connections open forever must not wear down the
server for everyone else. Each connection notes a deadline for what it is waiting for
(the rest of the headers, the next part of the body, the next request on a kept-alive
connection); one sweep a fraction of a second answers the overdue ones with 408 or closes
them, so the request path pays one clock read per request, not a timer. New connections
past the cap get 503 and are closed; the ones already open keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

# How often overdue connections are looked for: the precision of every timeout.
SWEEP_S = 0.25
# File descriptors kept free for everything that is not a client connection.
RESERVED_DESCRIPTORS = 256


class Waiting(enum.IntEnum):
    """What a connection waits for from its client (NOTHING: it is serving a request)."""

    NOTHING = 0
    IDLE = 1
    HEADERS = 2
    BODY = 3


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Sizes and times that bound what one client can hold (0 turns a timeout off)."""

    body_bytes: int = 64 * 1024 * 1024
    header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 60.0
    max_connections: int = 4096

    def timeout(self, waiting: Waiting) -> float:
        if waiting == Waiting.IDLE:
            return self.keepalive_timeout_s
        if waiting == Waiting.HEADERS:
            return self.header_timeout_s
        if waiting == Waiting.BODY:
            return self.body_timeout_s
        return 0.0


class Expirable(Protocol):
    """What the sweep and the listener's shutdown need of a connection."""

    waiting: Waiting
    deadline: float

    @property
    def idle(self) -> bool: ...

    def expire(self) -> None: ...

    def close(self) -> None: ...


def usable_connections(wanted: int) -> int:
    """``wanted``, or fewer if the process may not open that many descriptors; the soft
    limit is raised to the hard one first, as servers of many connections do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(1, min(wanted, soft - RESERVED_DESCRIPTORS))


class Connections:
    """The open connections of one listener, their limits and the sweep that expires them."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        # Each state's timeout, looked up per request by the connections.
        self.timeouts = {waiting: limits.timeout(waiting) for waiting in Waiting}
        self.max_connections = usable_connections(limits.max_connections)
        self._open: set[Expirable] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Expirable]:
        return iter(list(self._open))

    def admit(self, connection: Expirable) -> bool:
        """Count a new connection in, or refuse it (False) when the cap is reached."""
        if len(self._open) >= self.max_connections:
            return False
        self._open.add(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return True

    def discard(self, connection: Expirable) -> None:
        self._open.discard(connection)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for connection in list(self._open):
                if connection.waiting and connection.deadline and now > connection.deadline:
                    connection.expire()

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
