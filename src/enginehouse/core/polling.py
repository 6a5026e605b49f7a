"""Following a model repository's files: ``--model-control-mode poll``.

Every ``poll_s`` the repository is scanned and each model folder fingerprinted; a model
whose files changed is (re)loaded, one that left is unloaded. Each model's work runs in
its own task, so a slow build of one model does not hold back the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from enginehouse.core.lifecycle import Lifecycle
from enginehouse.errors import EnginehouseError
from enginehouse.repository import ModelLocation
from enginehouse.repository.fingerprint import model_fingerprint

log = logging.getLogger(__name__)


class RepositoryPoller:
    """Applies a repository's changes to the lifecycle's models, now and every ``poll_s``."""

    def __init__(self, lifecycle: Lifecycle, poll_s: float = 15.0) -> None:
        self.lifecycle = lifecycle
        self.registry = lifecycle.registry
        self.poll_s = poll_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Apply the repository as it is now, then keep following it."""
        await self.poll()
        await asyncio.gather(*self._tasks.values())
        self._loop_task = asyncio.get_running_loop().create_task(self._poll_loop())

    def stop(self) -> None:
        for task in [self._loop_task, *self._tasks.values()]:
            if task is not None:
                task.cancel()

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
        for name in self.lifecycle.repository.model_names():
            try:
                location = self.lifecycle.repository.locate(name)
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
        for name in list(self.registry.records):
            if name not in scanned and not self._busy(name):
                self._spawn(name, self._poll_remove(name))
        for name, location in scanned.items():
            if location is None or self._busy(name):
                continue
            record = self.registry.records.get(name)
            if record is None or record.fingerprint != prints[name]:
                self._spawn(name, self._poll_apply(location, prints[name]))

    def _busy(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def _spawn(self, name: str, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("polling: model '%s'", name)

        self._tasks[name] = asyncio.get_running_loop().create_task(run())

    async def _poll_apply(self, location: ModelLocation, fingerprint: str) -> None:
        record = self.registry.record(location.name)
        record.fingerprint = fingerprint
        if not location.version_dirs():
            await self.lifecycle.unload(location.name, "no version folder")
            return
        log.info("polling: model '%s' changed; loading", location.name)
        try:
            await self.lifecycle.load(location)
        except EnginehouseError as exc:
            log.error("polling: %s", exc.message)

    async def _poll_remove(self, name: str) -> None:
        log.info("polling: model '%s' left the repository; unloading", name)
        await self.lifecycle.unload(name)
        self.registry.records.pop(name, None)
