"""ServerCore: the in-process server that both frontends, the CLI and tests drive.

It owns the registry of served models and their states, loads and unloads models off
the event loop, routes each request to a model version, and drains on shutdown. All of
its state is touched from the event loop thread only.
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
from enginehouse.core.routing import ServedModel
from enginehouse.errors import (
    EnginehouseError,
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    UnavailableError,
    UnsupportedError,
)
from enginehouse.messages import InferRequest, InferResponse, ModelMetadata, RepositoryEntry
from enginehouse.repository import ModelLocation, ModelRepository, check_model_name
from enginehouse.repository.fingerprint import model_fingerprint
from enginehouse.runtime.memory import freeze_long_lived, release_freed_memory
from enginehouse.scheduler.base import PendingLimits
from enginehouse.scheduler.statistics import ModelStatistics

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
)


# Sends warm-up requests for a new model version through a frontend's own code.
RequestWarmer = Callable[[ModelVersion], Awaitable[None]]


class ControlMode(enum.StrEnum):
    """Triton's --model-control-mode values."""

    NONE = "none"
    EXPLICIT = "explicit"
    POLL = "poll"


class VersionState(enum.StrEnum):
    """The states of a model version in the repository index, as Triton names them."""

    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


@dataclass(slots=True)
class ModelRecord:
    """What the repository index says about a model: state and reason per version."""

    states: dict[str, tuple[VersionState, str]] = field(default_factory=dict)
    loading: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The model folder's fingerprint when polling last acted on it.
    fingerprint: str = ""


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
    ) -> None:
        from enginehouse.version import __version__

        self.version = __version__
        self.repository = repository
        self.control_mode = control_mode
        self.startup_models = tuple(startup_models)
        self.strict_model_config = strict_model_config
        self.strict_readiness = strict_readiness
        self.warmup = warmup
        self.latency_window = latency_window
        self.health_check_s = health_check_s
        self.engine_cache = engine_cache
        self.poll_s = poll_s
        self.pending_limits = pending_limits or PendingLimits()
        # (model, "success" | "failure") -> count of loads and reloads, for metrics.
        self.load_outcomes: Counter[tuple[str, str]] = Counter()
        self._poll_tasks: dict[str, asyncio.Task[None]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._served: dict[str, ServedModel] = {}
        self._warmers: list[RequestWarmer] = []
        self._ready_gates: list[Callable[[], Awaitable[None]]] = []
        self._records: dict[str, ModelRecord] = {}
        self._started = False
        self._draining = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models the control mode asks for at start; failures are logged."""
        if self.control_mode == ControlMode.POLL:
            await self.poll()
            await asyncio.gather(*self._poll_tasks.values())
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())
            await self._pass_ready_gates()
            self._started = True
            return
        if self.control_mode == ControlMode.NONE or "*" in self.startup_models:
            names = self.repository.model_names()
        else:
            names = list(dict.fromkeys(self.startup_models))
        results = await asyncio.gather(
            *(self._load_named(name) for name in names), return_exceptions=True
        )
        for name, result in zip(names, results):
            if isinstance(result, EnginehouseError):
                log.error("model '%s' failed to load: %s", name, result.message)
            elif isinstance(result, Exception):
                log.error("model '%s' failed to load", name, exc_info=result)
            elif isinstance(result, BaseException):
                raise result
        await self._pass_ready_gates()
        self._started = True

    def add_ready_gate(self, gate: Callable[[], Awaitable[None]]) -> None:
        """Run ``gate`` once the start-up loads are done and before the server reports ready
        (frontends in other processes warm their request paths through it)."""
        self._ready_gates.append(gate)

    async def _pass_ready_gates(self) -> None:
        for gate in self._ready_gates:
            try:
                await gate()
            except Exception:  # a failed warm-up must not keep the server from serving
                log.exception("a start-up warm-up failed")

    async def _load_named(self, name: str) -> None:
        await self._load(self.repository.locate(name))

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then unload everything."""
        self._draining = True
        for task in [self._poller, *self._poll_tasks.values()]:
            if task is not None:
                task.cancel()
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.in_flight:
            log.warning(
                "%d requests still in flight after %.1f s; stopping", self.in_flight, timeout_s
            )
        served = list(self._served.values())
        self._served.clear()
        for model in served:
            for version in model.versions.values():
                await version.shutdown()
            overrides.discard(model.staging)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered, over all models."""
        return sum(v.in_flight for m in self._served.values() for v in m.versions.values())

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        """Started, not draining, and (strict readiness) every known model has a ready version."""
        if not self._started or self._draining:
            return False
        if not self.strict_readiness:
            return True
        for name, record in self._records.items():
            unloaded = all(reason == "unloaded" for _, reason in record.states.values())
            if name not in self._served and not unloaded:
                return False
        return True

    # -- requests -----------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The model version a request addresses; 404 if unknown, 503 if loading."""
        model = self._served.get(name)
        if model is not None:
            if not version:
                return model.pick()
            found = model.versions.get(version)
            if found is not None:
                return found
            raise NotFoundError(
                f"model '{name}' has no ready version '{version}' "
                f"(ready: {', '.join(model.versions)})"
            )
        record = self._records.get(name)
        if record is not None and record.loading:
            raise UnavailableError(f"model '{name}' is loading")
        raise NotFoundError(f"unknown model: '{name}' is not found or not ready")

    def submit(self, request: InferRequest) -> InferResponse | Awaitable[InferResponse]:
        """The response at once when the model ran inline, else an awaitable of it.

        Frontends use this to skip a task switch for small models; :meth:`infer` is the
        plain form.
        """
        if self._draining:
            raise UnavailableError("server is shutting down")
        return self.resolve(request.model_name, request.model_version).submit(request)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request on the version it addresses."""
        result = self.submit(request)
        return result if isinstance(result, InferResponse) else await result

    # -- model information ---------------------------------------------------------------

    def model_ready(self, name: str, version: str = "") -> bool:
        model = self._served.get(name)
        if model is None:
            return False
        return not version or version in model.versions

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        target = self.resolve(name, version)
        return target.metadata(list(self._served[name].versions))

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self.resolve(name, version).config

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Statistics of one version, all versions of a model, or every ready version."""
        if not name:
            if version:
                raise InvalidArgumentError("a version needs a model name")
            return [v.statistics for m in self._served.values() for v in m.versions.values()]
        if version:
            return [self.resolve(name, version).statistics]
        model = self._served.get(name)
        if model is None:
            self.resolve(name)
            return []
        return [v.statistics for v in model.versions.values()]

    def served_versions(self) -> list[ModelVersion]:
        """Every model version now serving."""
        return [v for m in self._served.values() for v in m.versions.values()]

    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model in the repository with the state of each version it has tried."""
        entries: list[RepositoryEntry] = []
        for name in self.repository.model_names():
            record = self._records.get(name)
            if record is not None and record.loading and not record.states:
                if not ready_only:
                    entries.append(RepositoryEntry(name, "", VersionState.LOADING.value, ""))
                continue
            if record is None or not record.states:
                if not ready_only:
                    entries.append(RepositoryEntry(name, "", "", ""))
                continue
            for version, (state, reason) in sorted(record.states.items()):
                if record.loading and state != VersionState.READY:
                    state, reason = VersionState.LOADING, ""
                if ready_only and state != VersionState.READY:
                    continue
                entries.append(RepositoryEntry(name, version, state.value, reason))
        return entries

    # -- repository control --------------------------------------------------------------

    def _check_control(self) -> None:
        if self.control_mode == ControlMode.POLL:
            raise UnsupportedError(
                "explicit model load / unload is not allowed while the server polls the "
                "repository (--model-control-mode poll); change the files instead"
            )
        if self._started and self.control_mode == ControlMode.NONE:
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
        await self._load(location, override)

    async def _load(self, location: ModelLocation, override: mc.ModelConfig | None = None) -> None:
        """Load new or changed versions while the current ones serve, switch atomically once
        all of them are warm, then drain and free the versions no longer served. When
        something serves already, a reload is all or nothing: any failure keeps it serving."""
        name = location.name
        staging = location.path if location.root not in self.repository.roots else None
        record = self._records.setdefault(name, ModelRecord())
        async with record.lock:
            current = self._served.get(name)
            serving = {int(v): m for v, m in current.versions.items()} if current else None
            record.loading = True
            started = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(
                    loader.load_model,
                    location,
                    self.strict_model_config,
                    override,
                    self.warmup,
                    self.engine_cache,
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
                version.scheduler.limits = self.pending_limits
                await self._warm_request_paths(version)
                if self.latency_window:
                    version.statistics.keep_recent(self.latency_window)
            served = ServedModel.of(loaded.config, loaded.versions, staging)
            self._served[name] = served
            for version in fresh:
                version.start_health_checks(self.health_check_s)
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
                await self._retire(
                    [v for v in current.versions.values() if id(v) not in kept],
                    current.staging if current.staging != staging else None,
                )
            freeze_long_lived(idle=self.in_flight == 0)

    def _load_failed(
        self, name: str, record: ModelRecord, reason: str, versions: list[str]
    ) -> None:
        """Report a failed (re)load in the index, leaving versions that still serve READY."""
        self.load_outcomes[name, "failure"] += 1
        current = self._served.get(name)
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
        if not self.warmup or not version.warmup_inputs:
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
        if name not in self._records:
            self.repository.locate(name)
        await self._unload(name)

    async def _unload(self, name: str, reason: str = "unloaded") -> None:
        record = self._records.setdefault(name, ModelRecord())
        async with record.lock:
            old = self._served.pop(name, None)
            if old is None:
                for version in list(record.states):
                    record.states[version] = (VersionState.UNAVAILABLE, reason)
                return
            for version in old.versions:
                record.states[version] = (VersionState.UNLOADING, "")
            await self._retire(list(old.versions.values()), old.staging)
            for version in old.versions:
                record.states[version] = (VersionState.UNAVAILABLE, reason)
            freeze_long_lived(idle=self.in_flight == 0)
            log.info("model '%s' unloaded", name)

    async def _retire(self, versions: list[ModelVersion], staging: Path | None = None) -> None:
        """Wait for versions that left routing to finish their requests, then free them."""
        for version in versions:
            while version.in_flight:
                await asyncio.sleep(0.005)
            await version.shutdown()
        overrides.discard(staging)
        if versions:
            await asyncio.to_thread(release_freed_memory)

    # -- polling ---------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:
                log.exception("polling the model repository failed")

    def _scan(self) -> dict[str, ModelLocation | None]:
        """Every model folder and its fingerprint; None for folders that cannot be served."""
        found: dict[str, ModelLocation | None] = {}
        for name in self.repository.model_names():
            try:
                location = self.repository.locate(name)
            except EnginehouseError as exc:
                log.error("polling: %s", exc.message)
                found[name] = None
                continue
            found[name] = location
        return found

    async def poll(self) -> None:
        """Compare the repository with what was last applied; load, reload or unload the
        models that changed. Each model's work runs in its own task, so a slow build of one
        model does not hold back the others; a model still busy is looked at next time."""
        scanned = await asyncio.to_thread(self._scan)
        prints = await asyncio.to_thread(
            lambda: {n: model_fingerprint(loc.path) for n, loc in scanned.items() if loc}
        )
        for name in list(self._records):
            if name not in scanned and not self._busy(name):
                self._spawn(name, self._poll_remove(name))
        for name, location in scanned.items():
            if location is None or self._busy(name):
                continue
            record = self._records.get(name)
            if record is None or record.fingerprint != prints[name]:
                self._spawn(name, self._poll_apply(location, prints[name]))

    def _busy(self, name: str) -> bool:
        task = self._poll_tasks.get(name)
        return task is not None and not task.done()

    def _spawn(self, name: str, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("polling: model '%s'", name)

        self._poll_tasks[name] = asyncio.get_running_loop().create_task(run())

    async def _poll_apply(self, location: ModelLocation, fingerprint: str) -> None:
        record = self._records.setdefault(location.name, ModelRecord())
        record.fingerprint = fingerprint
        if not location.version_dirs():
            await self._unload(location.name, "no version folder")
            return
        log.info("polling: model '%s' changed; loading", location.name)
        try:
            await self._load(location)
        except EnginehouseError as exc:
            log.error("polling: %s", exc.message)

    async def _poll_remove(self, name: str) -> None:
        log.info("polling: model '%s' left the repository; unloading", name)
        await self._unload(name)
        self._records.pop(name, None)
