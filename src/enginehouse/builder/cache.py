"""The engine cache: content-addressed folders of built artefacts with their manifests.

A key is the SHA-256 of the source model's bytes, the build spec and the target's
fingerprint. An entry is ``<root>/<key>/`` holding the artefact files and
``manifest.json``, which lists every file with its size and SHA-256, so a truncated or
altered entry is detected and rebuilt. An entry is built in a private temporary folder
and renamed into place, under a per-key file lock: two processes building the same key
build it once, and nobody ever sees half an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enginehouse.builder.facts import SourceFacts, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ENV_VAR = "ENGINEHOUSE_CACHE"


def cache_key(model_sha256: str, spec: dict[str, Any], fingerprint: dict[str, Any]) -> str:
    """The key of a build: its source bytes, what to build, and for what."""
    text = json.dumps({"model": model_sha256, "spec": spec, "target": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A complete, verified entry."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def last_used(self) -> float:
        """When a load last used it (seconds since the epoch)."""
        return self.path.stat().st_mtime

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest.get("files", {}).values())


class EngineCache:
    """Built engines under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.facts = SourceFacts(root)

    def lookup(self, key: str, verify: bool = True, touch: bool = True) -> CacheEntry | None:
        """The entry for ``key`` if it is complete and intact; a damaged one is removed.
        ``touch`` marks it used now (its folder's modification time), as a load does."""
        path = self.root / key
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            for name, info in files.items():
                target = path / name
                if not target.is_file() or target.stat().st_size != int(info["size"]):
                    raise ValueError(f"{name} is missing or has the wrong size")
                # Hashed once per size and modification time: a truncated or rewritten
                # file is caught, and a warm start does not read every artefact in full.
                if verify and self.facts.sha256(target) != info["sha256"]:
                    raise ValueError(f"{name} does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("engine cache entry %s is damaged (%s); it will be rebuilt", key, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None
        if touch:
            # prune removes the least recently used; a read-only (baked) cache is not pruned.
            with contextlib.suppress(OSError):
                os.utime(path)
        return CacheEntry(key, path, manifest)

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        lock_path = self.root / f".{key}.lock"
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get_or_build(
        self, key: str, build: Callable[[Path], dict[str, Any]]
    ) -> tuple[CacheEntry, bool]:
        """(entry, hit): the cached entry, or one built now by ``build(folder)``.

        ``build`` writes its artefact files into the folder it is given and returns the
        manifest fields to record; the cache adds the file list, checksums and the key.
        """
        entry = self.lookup(key)
        if entry is not None:
            return entry, True
        with self._lock(key):
            entry = self.lookup(key)  # another process may have built it meanwhile
            if entry is not None:
                return entry, True
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
            try:
                started = time.perf_counter()
                fields = build(staging)
                files = {
                    p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                    for p in sorted(staging.iterdir())
                    if p.is_file()
                }
                manifest = {
                    "key": key,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.perf_counter() - started, 3),
                    **fields,
                    "files": files,
                }
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
                # mkdtemp made the staging folder private; a finished entry is readable by the
                # servers of other users (an image's non-root user reads what its build wrote).
                os.chmod(staging, 0o755)
                final = self.root / key
                if final.exists():
                    shutil.rmtree(final)
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return CacheEntry(key, final, manifest), False

    def entries(self) -> list[CacheEntry]:
        """Every complete entry (checked by size only, for speed)."""
        found = []
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                entry = self.lookup(path.name, verify=False, touch=False)
                if entry is not None:
                    found.append(entry)
        return found

    def prune(self, older_than_s: float | None = None, keep: set[str] | None = None) -> list[str]:
        """Remove entries last used over ``older_than_s`` ago (None: any age) that are not in
        ``keep``; also leftovers of interrupted builds. Returns the removed keys."""
        removed: list[str] = []
        now = time.time()
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                continue
            if not path.is_dir():
                continue
            if keep is not None and path.name in keep:
                continue
            age = now - path.stat().st_mtime
            if older_than_s is None or age > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed


# How every command finds the engine cache (stated once, shown in each command's help).
RESOLUTION = (
    "the engine cache is --engine-cache, else $ENGINEHOUSE_CACHE, else .enginehouse-cache "
    "beside the first --model-repository"
)


def default_root(repositories: list[Path]) -> Path:
    """``$ENGINEHOUSE_CACHE``, else ``.enginehouse-cache`` beside the first repository."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured)
    return repositories[0].resolve().parent / ".enginehouse-cache"
