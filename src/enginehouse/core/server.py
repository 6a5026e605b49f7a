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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.compiler.cache import EngineCache
from enginehouse.core import loader
from enginehouse.core.model import ModelVersion
from enginehouse.core.statistics import ModelStatistics
from enginehouse.core.types import InferRequest, InferResponse, ModelMetadata, RepositoryEntry
from enginehouse.errors import (
    EnginehouseError,
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    UnavailableError,
    UnsupportedError,
)
from enginehouse.repository import ModelRepository, check_model_name

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
    """Triton's --model-control-mode values (poll comes with repository polling)."""

    NONE = "none"
    EXPLICIT = "explicit"


class VersionState(enum.StrEnum):
    """The states of a model version in the repository index, as Triton names them."""

    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


@dataclass(slots=True)
class ServedModel:
    """The ready versions of one model and how an unversioned request finds one."""

    config: mc.ModelConfig
    versions: dict[str, ModelVersion]
    default: ModelVersion

    @classmethod
    def of(cls, config: mc.ModelConfig, versions: dict[int, ModelVersion]) -> ServedModel:
        ordered = sorted(versions)
        return cls(config, {str(v): versions[v] for v in ordered}, versions[ordered[-1]])


@dataclass(slots=True)
class ModelRecord:
    """What the repository index says about a model: state and reason per version."""

    states: dict[str, tuple[VersionState, str]] = field(default_factory=dict)
    loading: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
    ) -> None:
        from enginehouse import __version__

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
        self._served: dict[str, ServedModel] = {}
        self._warmers: list[RequestWarmer] = []
        self._records: dict[str, ModelRecord] = {}
        self._started = False
        self._draining = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models the control mode asks for at start; failures are logged."""
        if self.control_mode == ControlMode.NONE or "*" in self.startup_models:
            names = self.repository.model_names()
        else:
            names = list(dict.fromkeys(self.startup_models))
        results = await asyncio.gather(
            *(self.load_model(name) for name in names), return_exceptions=True
        )
        for name, result in zip(names, results):
            if isinstance(result, EnginehouseError):
                log.error("model '%s' failed to load: %s", name, result.message)
            elif isinstance(result, Exception):
                log.error("model '%s' failed to load", name, exc_info=result)
            elif isinstance(result, BaseException):
                raise result
        self._started = True

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then unload everything."""
        self._draining = True
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
                return model.default
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
        if self._started and self.control_mode == ControlMode.NONE:
            raise UnsupportedError(
                "explicit model load / unload is not allowed: the server runs with "
                "--model-control-mode none (use explicit)"
            )

    async def load_model(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load (or reload) a model: new versions serve only once all of them loaded."""
        self._check_control()
        check_model_name(name)
        if files:
            raise UnsupportedError(
                f"model '{name}': file overrides in load requests are not supported yet"
            )
        override = None
        if config_json is not None:
            override = mc.ModelConfig()
            try:
                json_format.Parse(config_json, override)
            except json_format.ParseError as exc:
                raise InvalidArgumentError(
                    f"model '{name}': invalid config override: {exc}"
                ) from None
        location = self.repository.locate(name)
        record = self._records.setdefault(name, ModelRecord())
        async with record.lock:
            previous = list(record.states) or [""]
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
                )
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, ModelLoadError)
                    else ModelLoadError(
                        f"model '{name}' failed to load: {type(exc).__name__}: {exc}"
                    )
                )
                if error is not exc:
                    log.error("model '%s' failed to load", name, exc_info=exc)
                if name not in self._served:
                    record.states = {v: (VersionState.UNAVAILABLE, error.message) for v in previous}
                raise error from None
            finally:
                record.loading = False
            for loaded_version in loaded.versions.values():
                await self._warm_request_paths(loaded_version)
            old = self._served.pop(name, None)
            if self.latency_window:
                for loaded_version in loaded.versions.values():
                    loaded_version.statistics.keep_recent(self.latency_window)
            if loaded.versions:
                self._served[name] = ServedModel.of(loaded.config, loaded.versions)
                for loaded_version in loaded.versions.values():
                    loaded_version.start_health_checks(self.health_check_s)
            record.states = {str(v): (VersionState.READY, "") for v in loaded.versions}
            for version, reason in loaded.failures.items():
                record.states[str(version)] = (VersionState.UNAVAILABLE, reason)
            if old is not None:
                await self._retire(old)
            if not loaded.versions:
                reasons = "; ".join(loaded.failures.values())
                raise ModelLoadError(f"model '{name}': no version loaded: {reasons}")
            log.info(
                "model '%s' versions %s ready in %.2f s",
                name,
                ", ".join(self._served[name].versions),
                time.perf_counter() - started,
            )

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
        record = self._records.get(name)
        if record is None:
            self.repository.locate(name)
            record = self._records.setdefault(name, ModelRecord())
        async with record.lock:
            old = self._served.pop(name, None)
            if old is None:
                for version in list(record.states):
                    record.states[version] = (VersionState.UNAVAILABLE, "unloaded")
                return
            for version in old.versions:
                record.states[version] = (VersionState.UNLOADING, "")
            await self._retire(old)
            for version in old.versions:
                record.states[version] = (VersionState.UNAVAILABLE, "unloaded")
            log.info("model '%s' unloaded", name)

    async def _retire(self, model: ServedModel) -> None:
        """Wait for a replaced model's requests to finish, then free its instances."""
        for version in model.versions.values():
            while version.in_flight:
                await asyncio.sleep(0.005)
            await version.shutdown()
