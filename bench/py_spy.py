"""Where a server's Python time goes during a load: py-spy samples it, this sums the samples.

A CPU figure per request (cpu_use.py) says how much a process spent, not on what. py-spy
(PyPI's ``py-spy``) samples a running process's Python stacks from outside it, without
stopping it (``--nonblocking``), so a load run can be profiled as it is measured. The
samples are kept as py-spy's collapsed stacks (one ``stack count`` line each) and summed
here per function: its own samples (the frame on top) and its inclusive ones (on the stack
at all), for one thread or all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r" \(([^()]*):\d+\)$")


def find_py_spy(given: str | None) -> str | None:
    """The py-spy executable: ``given``, or the one on PATH; None where there is none."""
    return given or shutil.which("py-spy")


def record(executable: str, pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` (its threads apart; only samples of the thread that holds the
    GIL, so waiting is left out and what is left is Python's own work) for ``seconds``
    into ``path`` (py-spy's own messages beside it, ``.log``); wait on the returned process
    for the file."""
    with open(path.with_suffix(".log"), "wb") as messages:
        return subprocess.Popen(
            [
                executable,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                "250",
                "--nonblocking",
                "--threads",
                "--gil",
                "--format",
                "raw",
                "--output",
                str(path),
            ],
            stdout=messages,
            stderr=subprocess.STDOUT,
        )


@dataclass(frozen=True, slots=True)
class Profile:
    """Summed samples of one collapsed-stack file."""

    samples: int
    by_thread: dict[str, int]
    own: Counter[str]
    inclusive: Counter[str]

    def top(self, count: int = 15, inclusive: bool = False) -> list[tuple[float, str]]:
        """The ``count`` dearest functions as (share of the samples, name)."""
        table = self.inclusive if inclusive else self.own
        return [(n / max(self.samples, 1), name) for name, n in table.most_common(count)]


def summarise(path: Path, thread: str | None = None) -> Profile:
    """The samples of ``path`` per function; with ``thread``, only those of threads whose
    name contains it (py-spy names a stack's thread first: ``thread (tid): name``)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].partition(": ")[2] or frames[0]
        by_thread[name] += int(count)
        if thread is not None and thread not in name:
            continue
        samples += int(count)
        functions = [_LINE.sub(r" (\1)", frame) for frame in frames[1:]]
        if functions:
            own[functions[-1]] += int(count)
        for function in set(functions):
            inclusive[function] += int(count)
    return Profile(samples, dict(by_thread), own, inclusive)


def report(path: Path, thread: str | None = None, count: int = 12) -> str:
    """A few lines naming the dearest functions of ``path`` by their own samples."""
    profile = summarise(path, thread)
    threads = ", ".join(f"{name} {n}" for name, n in Counter(profile.by_thread).most_common(4))
    lines = [f"    py-spy {path.name}: {profile.samples} samples ({threads})"]
    lines += [f"    {share:6.1%}  {name}" for share, name in profile.top(count)]
    return "\n".join(lines)
