"""Host and GPU gauges for the metrics endpoint: CPU through psutil, GPUs through NVML.

NVML is optional: on a machine without an NVIDIA driver the GPU gauges are simply absent,
as in tritonserver. Readings are taken at scrape time only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU's gauges at one moment."""

    uuid: str
    utilization: float  # 0..1, as Triton reports it
    memory_total: int
    memory_used: int
    power_watts: float
    power_limit_watts: float


class SystemMonitor:
    """Reads CPU, memory and (when NVML is there) GPU gauges."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        psutil.cpu_percent(None)  # the first call starts the measurement interval
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
            log.info("NVML: %d GPU(s) found for metrics", count)
        except Exception as exc:  # no driver, no library, no GPU: no GPU metrics
            log.debug("NVML not available: %s", exc)

    def cpu_utilization(self) -> float:
        """Fraction of all CPUs busy since the previous reading."""
        return float(psutil.cpu_percent(None)) / 100.0

    def memory(self) -> tuple[int, int]:
        """(total, used) bytes of host memory."""
        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.total - memory.available)

    def gpus(self) -> list[GpuReading]:
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        for handle in self._handles:
            try:
                uuid = nvml.nvmlDeviceGetUUID(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                limit = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
            except Exception as exc:  # a GPU that stops answering must not break the scrape
                log.warning("NVML reading failed: %s", exc)
                continue
            readings.append(
                GpuReading(
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    utilization=rates.gpu / 100.0,
                    memory_total=int(memory.total),
                    memory_used=int(memory.used),
                    power_watts=power,
                    power_limit_watts=limit,
                )
            )
        return readings
