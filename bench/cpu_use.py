"""CPU time of a server's processes and threads over a load run, read from /proc (Linux).

A served-throughput figure alone does not say where the time went. Sampled before and after
a load, this says how busy the core's event-loop thread was (near 100%: the core is the
limit), what its instance threads used, and what the gRPC worker processes cost per request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ticks(stat: str) -> tuple[str, int, int]:
    """(name, parent pid, utime + stime ticks) from a /proc stat line."""
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, int(fields[1]), int(fields[11]) + int(fields[12])


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """Seconds of CPU so far: per thread of the main process, and per child process."""

    pid: int
    threads: dict[tuple[int, str], float]
    children: dict[int, float]

    @classmethod
    def take(cls, pid: int) -> CpuSnapshot:
        threads = {}
        for task in Path(f"/proc/{pid}/task").glob("*"):
            text = _read(task / "stat")
            if text:
                name, _, ticks = _ticks(text)
                threads[(int(task.name), name)] = ticks / TICK
        children = {}
        for entry in Path("/proc").glob("[0-9]*"):
            text = _read(entry / "stat")
            if text:
                _, parent, ticks = _ticks(text)
                if parent == pid:
                    children[int(entry.name)] = ticks / TICK
        return cls(pid, threads, children)

    def seconds_since(self, before: CpuSnapshot) -> float:
        """CPU seconds the process and its children spent from ``before`` to this snapshot
        (a child started meanwhile counts whole)."""
        spent = sum(self.threads.values()) - sum(before.threads.values())
        return spent + sum(
            used - before.children.get(child, 0.0) for child, used in self.children.items()
        )


def cpu_report(
    before: CpuSnapshot, after: CpuSnapshot, seconds: float, requests: int
) -> dict[str, object]:
    """Busy fraction of the main thread, of the busiest other threads (by name) and of the
    busiest child process, and the core's and the children's CPU microseconds per request."""
    by_name: dict[str, float] = {}
    main = 0.0
    for key, used in after.threads.items():
        spent = used - before.threads.get(key, 0.0)
        if key[0] == after.pid:  # the main thread runs the event loop
            main = spent
        else:
            by_name[key[1]] = by_name.get(key[1], 0.0) + spent
    core = sum(after.threads.values()) - sum(before.threads.values())
    by_child = [
        used - before.children[pid]
        for pid, used in after.children.items()
        if pid in before.children
    ]
    children = sum(by_child)
    per = 1e6 / max(requests, 1)
    busiest = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
    return {
        "loop_busy": round(main / seconds, 3),
        "threads_busy": {name: round(used / seconds, 3) for name, used in busiest},
        "core_us_per_req": round(core * per, 1),
        "workers_us_per_req": round(children * per, 1),
        "busiest_worker": round(max(by_child, default=0.0) / seconds, 3),
    }
