"""The lifecycle of models: load, reload and unload, warm-up before serving, draining.

It reads models from the repository (through the loader, off the event loop), warms each
new version's request path, then publishes it in the registry in one switch; versions no
longer served are drained (their admitted requests answered) and freed. A reload is all or
nothing while something serves. The registry records every outcome for the repository index.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.builder.cache import EngineCache
from enginehouse.core import loader, overrides
from enginehouse.core.model import ModelVersion
from enginehouse.core.registry import ModelRecord, ModelRegistry, VersionState
from enginehouse.core.routing import ServedModel
from enginehouse.errors import (
    EnginehouseError,
    InvalidArgumentError,
    ModelLoadError,
    UnsupportedError,
)
from enginehouse.repository import ModelLocation, ModelRepository, check_model_name
from enginehouse.runtime.memory import freeze_long_lived, release_freed_memory
from enginehouse.scheduler.base import PendingLimits

log = logging.getLogger(__name__)

# Sends warm-up requests for a new model version through a frontend's own code.
RequestWarmer = Callable[[ModelVersion], Awaitable[None]]


# How long loads and unloads must pause before what they left behind is frozen.
FREEZE_AFTER_S = 0.2


class ControlMode(enum.StrEnum):
    """Triton's --model-control-mode values."""

    NONE = "none"
    EXPLICIT = "explicit"
    POLL = "poll"


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """How the lifecycle loads and prepares every model version."""

    strict_model_config: bool = False
    warmup: bool = True
    # Requests whose latencies each version keeps for summaries (0: none).
    latency_window: int = 0
    health_check_s: float = 0.0
    engine_cache: EngineCache | None = None
    pending_limits: PendingLimits = field(default_factory=PendingLimits)


class Lifecycle:
    """Loads, reloads and unloads the models of a repository into a registry."""

    def __init__(
        self,
        repository: ModelRepository,
        registry: ModelRegistry,
        control_mode: ControlMode = ControlMode.NONE,
        settings: LoadSettings = LoadSettings(),
    ) -> None:
        self.repository = repository
        self.registry = registry
        self.control_mode = control_mode
        self.settings = settings
        # (model, "success" | "failure") -> count of loads and reloads, for metrics.
        self.load_outcomes: Counter[tuple[str, str]] = Counter()
        self.started = False
        self._warmers: list[RequestWarmer] = []
        self._freeze: asyncio.TimerHandle | None = None
        self._ready_gates: list[Callable[[], Awaitable[None]]] = []

    async def load_startup_models(self, names: Iterable[str]) -> None:
        """Load the models the control mode asks for at start; failures are logged."""
        if self.control_mode == ControlMode.NONE or "*" in names:
            chosen = self.repository.model_names()
        else:
            chosen = list(dict.fromkeys(names))
        results = await asyncio.gather(
            *(self.load(self.repository.locate(name)) for name in chosen),
            return_exceptions=True,
        )
        for name, result in zip(chosen, results):
            if isinstance(result, EnginehouseError):
                log.error("model '%s' failed to load: %s", name, result.message)
            elif isinstance(result, Exception):
                log.error("model '%s' failed to load", name, exc_info=result)
            elif isinstance(result, BaseException):
                raise result

    def _freeze_when_settled(self) -> None:
        """Freeze what loads left behind once loads and unloads pause for a moment: a full
        collection walks the whole heap (0.1 s and more), and a start-up that loads twenty
        models should pay for it once, not twenty times."""
        if self._freeze is not None:
            self._freeze.cancel()

        def freeze() -> None:
            self._freeze = None
            freeze_long_lived(idle=self.registry.in_flight == 0)

        self._freeze = asyncio.get_running_loop().call_later(FREEZE_AFTER_S, freeze)

    def add_ready_gate(self, gate: Callable[[], Awaitable[None]]) -> None:
        """Run ``gate`` once the start-up loads are done and before the server reports ready
        (frontends in other processes warm their request paths through it)."""
        self._ready_gates.append(gate)

    async def pass_ready_gates(self) -> None:
        for gate in self._ready_gates:
            try:
                await gate()
            except Exception:  # a failed warm-up must not keep the server from serving
                log.exception("a start-up warm-up failed")
        self.started = True

    async def unload_all(self) -> None:
        """Free every served version at once (shutdown, after the drain)."""
        if self._freeze is not None:
            self._freeze.cancel()
        registry = self.registry
        for name in list(registry.served):
            model = registry.withdraw(name)
            if model is None:
                continue
            for version in model.versions.values():
                await version.shutdown()
            overrides.discard(model.staging)

    # -- repository control --------------------------------------------------------------

    def _check_control(self) -> None:
        if self.control_mode == ControlMode.POLL:
            raise UnsupportedError(
                "explicit model load / unload is not allowed while the server polls the "
                "repository (--model-control-mode poll); change the files instead"
            )
        if self.started and self.control_mode == ControlMode.NONE:
            raise UnsupportedError(
                "explicit model load / unload is not allowed: the server runs with "
                "--model-control-mode none (use explicit)"
            )

    async def load_model(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load or reload a model from the repository API (Triton's ``config`` and
        ``file:<version>/<name>`` overrides included)."""
        self._check_control()
        check_model_name(name)
        override = None
        if config_json is not None:
            override = mc.ModelConfig()
            try:
                json_format.Parse(config_json, override)
            except json_format.ParseError as exc:
                raise InvalidArgumentError(
                    f"model '{name}': invalid config override: {exc}"
                ) from None
        if files:
            if override is None:
                raise InvalidArgumentError(
                    f"model '{name}': file overrides need a 'config' parameter as well"
                )
            location = await asyncio.to_thread(overrides.stage, name, files)
        else:
            location = self.repository.locate(name)
        await self.load(location, override)

    async def load(self, location: ModelLocation, override: mc.ModelConfig | None = None) -> None:
        """Load new or changed versions while the current ones serve, switch atomically once
        all of them are warm, then drain and free the versions no longer served. When
        something serves already, a reload is all or nothing: any failure keeps it serving."""
        name = location.name
        staging = location.path if location.root not in self.repository.roots else None
        record = self.registry.record(name)
        async with record.lock:
            current = self.registry.served.get(name)
            serving = {int(v): m for v, m in current.versions.items()} if current else None
            record.loading = True
            started = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(
                    loader.load_model,
                    location,
                    self.settings.strict_model_config,
                    override,
                    self.settings.warmup,
                    self.settings.engine_cache,
                    serving,
                )
            except Exception as exc:
                overrides.discard(staging)
                error = (
                    exc
                    if isinstance(exc, ModelLoadError)
                    else ModelLoadError(
                        f"model '{name}' failed to load: {type(exc).__name__}: {exc}"
                    )
                )
                if error is not exc:
                    log.error("model '%s' failed to load", name, exc_info=exc)
                failed = (
                    [str(error.version)]
                    if error.version is not None
                    else list(record.states) or [""]
                )
                self._load_failed(name, record, error.message, failed)
                if current is not None:
                    error = ModelLoadError(
                        f"model '{name}' failed to reload (the serving versions keep "
                        f"serving): {error.message}",
                        error.version,
                    )
                raise error from None
            finally:
                record.loading = False
            fresh = loaded.fresh
            if (loaded.failures and current is not None) or not loaded.versions:
                for version in fresh:
                    await version.shutdown()
                overrides.discard(staging)
                reasons = "; ".join(f"version {v}: {r}" for v, r in loaded.failures.items())
                outcome = "the serving versions keep serving" if current else "nothing serves"
                self._load_failed(name, record, reasons, [str(v) for v in loaded.failures])
                raise ModelLoadError(f"model '{name}' failed to load ({outcome}): {reasons}")
            for version in fresh:
                version.scheduler.limits = self.settings.pending_limits
                await self._warm_request_paths(version)
                if self.settings.latency_window:
                    version.statistics.keep_recent(self.settings.latency_window)
            served = ServedModel.of(loaded.config, loaded.versions, staging)
            self.registry.publish(name, served)
            for version in fresh:
                version.start_health_checks(self.settings.health_check_s)
            record.states = {str(v): (VersionState.READY, "") for v in loaded.versions}
            for number, reason in loaded.failures.items():
                record.states[str(number)] = (VersionState.UNAVAILABLE, reason)
            self.load_outcomes[name, "success"] += 1
            log.info(
                "model '%s' versions %s ready in %.2f s (%d loaded, %d kept)",
                name,
                ", ".join(served.versions),
                time.perf_counter() - started,
                len(fresh),
                len(loaded.kept),
            )
            if current is not None:
                kept = set(map(id, served.versions.values()))
                await self.retire(
                    [v for v in current.versions.values() if id(v) not in kept],
                    current.staging if current.staging != staging else None,
                )
            self._freeze_when_settled()

    def _load_failed(
        self, name: str, record: ModelRecord, reason: str, versions: list[str]
    ) -> None:
        """Report a failed (re)load in the index, leaving versions that still serve READY."""
        self.load_outcomes[name, "failure"] += 1
        current = self.registry.served.get(name)
        for version in versions:
            if current is not None and version in current.versions:
                record.states[version] = (VersionState.READY, f"reload failed: {reason}")
            else:
                record.states[version] = (VersionState.UNAVAILABLE, reason)
        if current is None:
            for version, (state, _) in list(record.states.items()):
                if state == VersionState.READY:
                    record.states[version] = (VersionState.UNAVAILABLE, reason)

    def add_request_warmer(self, warmer: RequestWarmer) -> None:
        """Run ``warmer`` on every new version before it serves (frontends warm their codecs)."""
        self._warmers.append(warmer)

    async def _warm_request_paths(self, version: ModelVersion) -> None:
        if not self.settings.warmup or not version.warmup_inputs:
            return
        try:
            await version.warm_request_path()
            for warmer in self._warmers:
                await warmer(version)
        except EnginehouseError as exc:
            log.warning(
                "model '%s' version %s: request-path warm-up failed: %s",
                version.name,
                version.version,
                exc.message,
            )
        version.reset_statistics()

    async def unload_model(self, name: str) -> None:
        """Stop serving a model: it leaves routing at once, its requests in flight finish."""
        self._check_control()
        check_model_name(name)
        if name not in self.registry.records:
            self.repository.locate(name)
        await self.unload(name)

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        record = self.registry.record(name)
        async with record.lock:
            old = self.registry.withdraw(name)
            if old is None:
                for version in list(record.states):
                    record.states[version] = (VersionState.UNAVAILABLE, reason)
                return
            for version in old.versions:
                record.states[version] = (VersionState.UNLOADING, "")
            await self.retire(list(old.versions.values()), old.staging)
            for version in old.versions:
                record.states[version] = (VersionState.UNAVAILABLE, reason)
            self._freeze_when_settled()
            log.info("model '%s' unloaded", name)

    async def retire(self, versions: list[ModelVersion], staging: Path | None = None) -> None:
        """Wait for versions that left routing to finish their requests, then free them."""
        for version in versions:
            await version.scheduler.drain()
            await version.shutdown()
        overrides.discard(staging)
        if versions:
            await asyncio.to_thread(release_freed_memory)
