"""NVML gauges on a machine with an NVIDIA GPU (skipped elsewhere)."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

from enginehouse.testing import ServerProcess

pynvml = pytest.importorskip("pynvml")
try:
    pynvml.nvmlInit()
    GPUS = pynvml.nvmlDeviceGetCount()
except Exception:  # no driver: nothing to test here
    GPUS = 0

pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs an NVIDIA GPU")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))


def test_gpu_gauges_are_real(tmp_path: Path) -> None:
    from make_repository import make_repository

    repo = make_repository(tmp_path / "repo", with_torch=False)
    with ServerProcess([repo], log_path=tmp_path / "server.log") as server:
        server.wait_ready()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("nv_gpu_"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    uuids = {key.split('gpu_uuid="')[1].split('"')[0] for key in values}
    assert len(uuids) == GPUS
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    for uuid in uuids:
        label = f'{{gpu_uuid="{uuid}"}}'
        assert values["nv_gpu_memory_total_bytes" + label] > 0
        assert 0 <= values["nv_gpu_utilization" + label] <= 1
        assert values["nv_gpu_power_usage" + label] > 0
        assert values["nv_gpu_power_limit" + label] >= values["nv_gpu_power_usage" + label] * 0.5
    assert total in {values[k] for k in values if k.startswith("nv_gpu_memory_total_bytes")}
