"""ServerCore: the in-process server that both frontends, the CLI and tests drive.

A small facade over three objects with one job each: the :class:`ModelRegistry` (what
serves), the :class:`Lifecycle` (loading, unloading, warm-up, with the
:class:`RepositoryPoller` in poll mode) and the :class:`DataPlane` (requests). It starts
them in order and drains on shutdown. All of its state is touched from the event loop
thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from enginehouse.builder.cache import EngineCache
from enginehouse.core import cuda_ipc
from enginehouse.core.data_plane import DataPlane
from enginehouse.core.lifecycle import ControlMode, Lifecycle, LoadSettings, RequestWarmer
from enginehouse.core.polling import RepositoryPoller
from enginehouse.core.registry import ModelRegistry, VersionState
from enginehouse.messages import RepositoryEntry
from enginehouse.repository import ModelRepository
from enginehouse.scheduler.base import PendingLimits

log = logging.getLogger(__name__)

SERVER_NAME = "enginehouse"

EXTENSIONS = (
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "parameters",
    "system_shared_memory",
)
# Listed where a CUDA driver and a device are there to open clients' regions with.
CUDA_SHARED_MEMORY = "cuda_shared_memory"

__all__ = [
    "CUDA_SHARED_MEMORY",
    "EXTENSIONS",
    "SERVER_NAME",
    "ControlMode",
    "ServerCore",
    "VersionState",
]


class ServerCore:
    """Serves the models of a repository; every frontend is a translation of this API."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        control_mode: ControlMode = ControlMode.NONE,
        startup_models: Iterable[str] = (),
        strict_model_config: bool = False,
        strict_readiness: bool = True,
        warmup: bool = True,
        latency_window: int = 0,
        health_check_s: float = 0.0,
        engine_cache: EngineCache | None = None,
        poll_s: float = 15.0,
        pending_limits: PendingLimits | None = None,
        map_shared_memory: bool | None = None,
        pin_shared_memory: bool | None = None,
    ) -> None:
        from enginehouse.version import __version__

        self.version = __version__
        self.repository = repository
        self.control_mode = control_mode
        self.startup_models = tuple(startup_models)
        self.strict_readiness = strict_readiness
        self.registry = ModelRegistry()
        settings = LoadSettings(
            strict_model_config,
            warmup,
            latency_window,
            health_check_s,
            engine_cache,
            pending_limits or PendingLimits(),
        )
        self.lifecycle = Lifecycle(repository, self.registry, control_mode, settings)
        self.poller = RepositoryPoller(self.lifecycle, poll_s)
        self.data = DataPlane(self.registry, map_shared_memory, pin_shared_memory)
        # The request path and the questions clients ask, straight to their owners: the
        # facade adds no call on the way.
        self.submit = self.data.submit
        self.infer = self.data.infer
        self.model_metadata = self.data.model_metadata
        self.model_config = self.data.model_config
        self.model_statistics = self.data.model_statistics
        self.resolve = self.registry.resolve
        self.model_ready = self.registry.model_ready
        self.served_versions = self.registry.served_versions
        self.load_model = self.lifecycle.load_model
        self.unload_model = self.lifecycle.unload_model
        self.load_outcomes = self.lifecycle.load_outcomes
        self.shared_memory = self.data.shared_memory
        self._extensions: tuple[str, ...] | None = None

    @property
    def extensions(self) -> tuple[str, ...]:
        """The Triton protocol extensions this server offers (server metadata lists them)."""
        if self._extensions is None:
            cuda = (CUDA_SHARED_MEMORY,) if cuda_ipc.available() else ()
            self._extensions = EXTENSIONS + cuda
        return self._extensions

    async def start(self) -> None:
        """Load what the control mode asks for at start (failures are logged), pass the
        ready gates, then report ready."""
        if self.control_mode == ControlMode.POLL:
            await self.poller.start()
        else:
            await self.lifecycle.load_startup_models(self.startup_models)
        await self.lifecycle.pass_ready_gates()

    async def poll(self) -> None:
        """Apply the repository's changes now (poll mode does this every ``poll_s``)."""
        await self.poller.poll()

    def add_ready_gate(self, gate: Callable[[], Awaitable[None]]) -> None:
        """Run ``gate`` after the start-up loads, before the server reports ready."""
        self.lifecycle.add_ready_gate(gate)

    def add_request_warmer(self, warmer: RequestWarmer) -> None:
        """Run ``warmer`` on every new version before it serves (frontends warm their codecs)."""
        self.lifecycle.add_request_warmer(warmer)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then unload everything."""
        self.data.draining = True
        self.poller.stop()
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.in_flight:
            log.warning(
                "%d requests still in flight after %.1f s; stopping", self.in_flight, timeout_s
            )
        await self.lifecycle.unload_all()
        self.shared_memory.close()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered, over all models."""
        return self.registry.in_flight

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        """Started, not draining, and (strict readiness) every known model has a ready version."""
        if not self.lifecycle.started or self.data.draining:
            return False
        return not self.strict_readiness or self.registry.all_ready()

    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model in the repository with the state of each version it has tried."""
        return self.registry.index(self.repository.model_names(), ready_only)
