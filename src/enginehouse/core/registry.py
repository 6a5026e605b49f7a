"""The model registry: which versions serve, and what the repository index says of each.

The registry holds state and answers questions about it; it never loads, waits or runs
anything. The lifecycle writes to it (publish, withdraw, record states), the data plane
and the frontends read it. All of it is touched from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from enginehouse.core.model import ModelVersion
from enginehouse.core.routing import ServedModel
from enginehouse.errors import NotFoundError, UnavailableError
from enginehouse.messages import RepositoryEntry


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


class ModelRegistry:
    """The served models by name, and a record for every model the server has tried."""

    def __init__(self) -> None:
        self.served: dict[str, ServedModel] = {}
        self.records: dict[str, ModelRecord] = {}

    def record(self, name: str) -> ModelRecord:
        """The record of a model, made on first use."""
        record = self.records.get(name)
        if record is None:
            record = self.records[name] = ModelRecord()
        return record

    def publish(self, name: str, model: ServedModel) -> None:
        """Route requests for ``name`` to ``model`` from now on (an atomic switch)."""
        self.served[name] = model

    def withdraw(self, name: str) -> ServedModel | None:
        """Stop routing requests to ``name``; returns what served it."""
        return self.served.pop(name, None)

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The model version a request addresses; 404 if unknown, 503 if loading."""
        model = self.served.get(name)
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
        record = self.records.get(name)
        if record is not None and record.loading:
            raise UnavailableError(f"model '{name}' is loading")
        raise NotFoundError(f"unknown model: '{name}' is not found or not ready")

    def model_ready(self, name: str, version: str = "") -> bool:
        model = self.served.get(name)
        if model is None:
            return False
        return not version or version in model.versions

    def served_versions(self) -> list[ModelVersion]:
        """Every model version now serving."""
        return [v for m in self.served.values() for v in m.versions.values()]

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered, over all served versions."""
        return sum(v.in_flight for m in self.served.values() for v in m.versions.values())

    def all_ready(self) -> bool:
        """Every model the server has tried serves, unless it was unloaded on purpose."""
        for name, record in self.records.items():
            unloaded = all(reason == "unloaded" for _, reason in record.states.values())
            if name not in self.served and not unloaded:
                return False
        return True

    def index(self, names: list[str], ready_only: bool = False) -> list[RepositoryEntry]:
        """The repository index of the models ``names``: each version tried and its state."""
        entries: list[RepositoryEntry] = []
        for name in names:
            record = self.records.get(name)
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
