"""NVML gauges on a machine with an NVIDIA GPU (skipped elsewhere)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pynvml = pytest.importorskip("pynvml")
try:
    pynvml.nvmlInit()
    GPUS = pynvml.nvmlDeviceGetCount()
except Exception:  # no driver: nothing to test here
    GPUS = 0

pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs an NVIDIA GPU")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gpu_gauges_are_real(tmp_path: Path) -> None:
    from make_repository import make_repository

    repo = make_repository(tmp_path / "repo", with_torch=False)
    http, grpc, metrics = _port(), _port(), _port()
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enginehouse.cli",
            "serve",
            "--model-repository",
            str(repo),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
    finally:
        server.terminate()
        server.wait(60)
        log.close()
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
