"""The idle cores read from /proc/stat's counters (a file of their form, and this machine's)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from enginehouse.runtime.spare_cores import SpareCores


def _stat(path: Path, busy: int, idle: int) -> None:
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy} 0 0 {idle} 0 0 0 0 0 0\n")


def test_idle_cores_between_two_readings(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    now = [0.0]
    spare = SpareCores(str(stat), interval_s=0.5, clock=lambda: now[0], cores=4)
    _stat(stat, busy=1000, idle=1000)
    assert spare() == math.inf, "one reading says nothing yet"
    _stat(stat, busy=1300, idle=1100)  # 300 busy and 100 idle ticks: a quarter idle
    assert spare() == math.inf, "read again only once the interval has passed"
    now[0] = 0.6
    assert spare() == 1.0
    _stat(stat, busy=1300, idle=1500)
    now[0] = 0.8
    assert spare() == 1.0
    now[0] = 1.2
    assert spare() == 4.0


def test_unreadable_counters_mean_cores_to_spare(tmp_path: Path) -> None:
    assert SpareCores(str(tmp_path / "missing"))() == math.inf
    (tmp_path / "bad").write_text("intr 1 2 3\n")
    assert SpareCores(str(tmp_path / "bad"))() == math.inf


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="no /proc/stat here")
def test_this_machine() -> None:
    """Two readings of the real counters, a tenth of a second apart: between none and all
    of this machine's cores were idle."""
    now = [0.0]
    spare = SpareCores(clock=lambda: now[0])
    assert spare() == math.inf
    time.sleep(0.1)  # the kernel counts ticks at 100 Hz or more per core
    now[0] = 1.0
    idle = spare()
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-9
