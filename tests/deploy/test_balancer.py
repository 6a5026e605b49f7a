"""Scale-out on loopback: three servers behind HAProxy under steady HTTP and gRPC load are
restarted one at a time and a fourth is added; not one request fails, and the fourth takes
traffic within seconds of turning ready. (bench/scale_out.py measures the same, longer.)"""

from __future__ import annotations

import time
from pathlib import Path

from make_repository import make_repository

from tests.deploy.conftest import tool
from tests.deploy.fleet import Fleet, Load


def test_rolling_restart_and_scale_out_lose_no_request(tmp_path: Path) -> None:
    tool("haproxy")
    repository = make_repository(tmp_path / "repo", with_torch=False)
    fleet = Fleet(repository, tmp_path, slots=4, running=3)
    load = Load(fleet)
    try:
        load.start()
        time.sleep(2)
        for member in fleet.members[:3]:
            fleet.restart(member)
            time.sleep(1)
        fourth = fleet.members[3]
        fleet.start(fourth)
        assert fourth.server is not None
        fourth.server.wait_ready()
        ready_at = time.monotonic()
        while fleet.served_by(fourth) == 0:
            assert time.monotonic() - ready_at < 10, fleet.states()
            time.sleep(0.05)
        joined_s = time.monotonic() - ready_at
        time.sleep(2)
    finally:
        load.stop()
        fleet.stop()
    assert not load.failures, load.failures[:10]
    assert load.outcomes["http ok"] > 100 and load.outcomes["grpc ok"] > 100, load.outcomes
    assert joined_s < 5
