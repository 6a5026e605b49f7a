"""enginehouse's testing API, for our tests and benchmarks and for users' own.

- :class:`InProcessServer`: the whole server (core, HTTP, gRPC, metrics) assembled from
  ``serve``'s flags on a thread of the test's process, on loopback ports;
- :class:`ServerProcess`: the real command in a child process, for tests of the process
  itself (signals, exit codes, memory, gRPC workers);
- :mod:`enginehouse.testing.fake_backend`: a backend whose latency and failures a test sets.
"""

from enginehouse.testing.in_process import InProcessServer
from enginehouse.testing.process import (
    SERVER_MODULES,
    ServerProcess,
    free_port,
    free_ports,
    keep_bytecode,
)
from enginehouse.testing.running import RunningServer

__all__ = [
    "SERVER_MODULES",
    "InProcessServer",
    "RunningServer",
    "ServerProcess",
    "free_port",
    "free_ports",
    "keep_bytecode",
]
