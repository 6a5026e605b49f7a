"""What the server needs to know about a source model file, remembered across starts.

Hashing a 90 MB model and parsing it for its signature take longer than loading its built
engine; both depend only on the file's bytes. They are kept in ``.facts.json`` in the
engine cache, keyed by path, size and modification time, so a warm start reads neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enginehouse import datatypes
from enginehouse.config.autocomplete import GraphSignature, GraphTensor, read_signature

_FILE = ".facts.json"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _encode(signature: GraphSignature) -> dict[str, Any]:
    return {
        kind: [[t.name, t.datatype.name, list(t.shape)] for t in tensors]
        for kind, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs))
    }


def _decode(value: dict[str, Any]) -> GraphSignature:
    def tensors(kind: str) -> tuple[GraphTensor, ...]:
        return tuple(
            GraphTensor(name, datatypes.BY_NAME[dtype], tuple(shape))
            for name, dtype, shape in value[kind]
        )

    return GraphSignature(tensors("inputs"), tensors("outputs"))


class SourceFacts:
    """SHA-256 and graph signature of source files; remembered on disk when given a folder."""

    def __init__(self, root: Path | None) -> None:
        self._path = root / _FILE if root is not None else None
        self._lock = threading.Lock()
        self._facts: dict[str, dict[str, Any]] = {}
        if self._path is not None and self._path.is_file():
            try:
                self._facts = json.loads(self._path.read_text())
            except (OSError, ValueError):
                self._facts = {}

    def _entry(self, path: Path) -> tuple[str, dict[str, Any], tuple[int, int]]:
        stat = path.stat()
        key = str(path.resolve())
        stamp = (stat.st_size, stat.st_mtime_ns)
        entry = self._facts.get(key, {})
        if tuple(entry.get("stamp", ())) != stamp:
            entry = {"stamp": list(stamp)}
        return key, entry, stamp

    def _save(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._facts[key] = entry
            if self._path is None:
                return
            staging = self._path.with_name(f"{_FILE}.{os.getpid()}.{threading.get_ident()}")
            try:
                staging.write_text(json.dumps(self._facts))
                os.replace(staging, self._path)
            except OSError:
                # A cache baked into a read-only image: the facts stay in memory.
                self._path = None

    def sha256(self, path: Path) -> str:
        key, entry, _ = self._entry(path)
        if "sha256" not in entry:
            entry = {**entry, "sha256": file_sha256(path)}
            self._save(key, entry)
        return str(entry["sha256"])

    def remembered(self, path: Path, name: str, compute: Callable[[Path], Any]) -> Any:
        """``compute(path)`` (a JSON value), remembered under ``name`` until the file changes."""
        key, entry, _ = self._entry(path)
        if name not in entry:
            entry = {**entry, name: compute(path)}
            self._save(key, entry)
        return entry[name]

    def signature(self, path: Path) -> GraphSignature:
        key, entry, _ = self._entry(path)
        if "signature" not in entry:
            entry = {**entry, "signature": _encode(read_signature(path))}
            self._save(key, entry)
        return _decode(entry["signature"])
