"""The SIGBUS guard itself, in child processes (a guard that failed would end the process
that tested it): a fault inside a guarded range is absorbed and counted, a fault anywhere
else still ends the process as it would have without the guard."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from enginehouse.core import mapping_guard

pytestmark = pytest.mark.skipif(not mapping_guard.AVAILABLE, reason="the guard is not built")

CHILD = """
import faulthandler, mmap, os, sys
import numpy as np
from enginehouse.core.mapping_guard import GuardedMapping

if sys.argv[3] == "faulthandler":
    faulthandler.enable()  # a handler installed before the guard's, as pytest installs one
path = sys.argv[1]
with open(path, "wb") as file:
    file.write(np.arange(4096, dtype=np.int32).tobytes())  # four pages
fd = os.open(path, os.O_RDWR)
guarded = mmap.mmap(fd, 16384)
other = mmap.mmap(fd, 16384)
guard = GuardedMapping(guarded) if sys.argv[2] != "none" else None
os.truncate(path, 4096)  # one page left
if sys.argv[2] == "guarded":
    data = np.frombuffer(guarded, np.int32)
    print(int(data[:1024].sum()), int(data.sum()), guard.faults())
    np.frombuffer(guarded, np.uint8)[8192:] = 1  # a write past the end as well
    print(guard.faults())
    guard.close()
    print(guard.faults())
else:  # a fault outside every guarded range
    print(int(np.frombuffer(other, np.int32).sum()))
"""


def _child(tmp_path: Path, mode: str, handler: str = "none") -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "object"), mode, handler],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("handler", ["none", "faulthandler"])
def test_a_fault_inside_a_guarded_range_reads_zeros_and_is_counted(
    tmp_path: Path, handler: str
) -> None:
    done = _child(tmp_path, "guarded", handler)
    assert done.returncode == 0, done.stderr
    whole_page, everything, faults, after_write, after_close = done.stdout.split()
    assert int(whole_page) == sum(range(1024))  # the page the object still holds
    assert int(everything) == sum(range(1024))  # the rest reads as zeros
    assert int(faults) == 1  # one fault: the rest of the range was replaced at once
    assert int(after_write) == 1  # already replaced: the write faults no more
    assert int(after_close) == 1  # the count outlives the guard


@pytest.mark.parametrize("handler", ["none", "faulthandler"])
def test_a_fault_outside_every_guarded_range_still_ends_the_process(
    tmp_path: Path, handler: str
) -> None:
    done = _child(tmp_path, "unguarded", handler)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)
    if handler == "faulthandler":
        assert "Bus error" in done.stderr  # the earlier handler saw it


def test_no_guard_at_all_is_the_plain_default(tmp_path: Path) -> None:
    done = _child(tmp_path, "none")
    assert done.returncode == -signal.SIGBUS
