"""Cheap fingerprints of model folders, for polling and for reusing unchanged versions.

A fingerprint is a hash of the relative path, size and modification time of every file,
so a scan reads directory entries and inode metadata, never file contents: polling a
repository of large models every few seconds stays cheap. Tools that rewrite a file
within the same nanosecond and keep its size defeat it; copying or moving files, which is
how repositories are updated, does not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

# Parameters that steer routing between versions; changing them reloads no version.
ROUTING_PARAMETERS = ("version_weights",)


def _walk(top: Path, keep: Callable[[str], bool]) -> Iterable[str]:
    """Lines 'relative-path size mtime' for the files under ``top`` that ``keep`` accepts."""
    for folder, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        base = os.path.relpath(folder, top)
        for name in sorted(files):
            relative = name if base == "." else f"{base}/{name}"
            if not keep(relative):
                continue
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:
                continue  # removed while we looked: the next scan sees the new state
            yield f"{relative} {stat.st_size} {stat.st_mtime_ns}"


def _digest(lines: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for line in lines:
        hasher.update(line.encode("utf-8", "surrogateescape"))
        hasher.update(b"\n")
    return hasher.hexdigest()


def model_fingerprint(path: Path) -> str:
    """Changes whenever any file of the model folder is added, removed or rewritten."""
    return _digest(_walk(path, lambda _: True))


def _is_version_file(relative: str) -> bool:
    head = relative.split("/", 1)[0]
    return "/" in relative and head.isdigit()


def version_identity(path: Path, version: int, config: mc.ModelConfig) -> str:
    """What a loaded version depends on: its own files, the model-level files other than
    config.pbtxt (warm-up data, calibration samples) and the config minus the fields that
    only route between versions. Equal identities mean the loaded version can be kept."""
    served = mc.ModelConfig()
    served.CopyFrom(config)
    served.ClearField("version_policy")
    for key in ROUTING_PARAMETERS:
        if key in served.parameters:
            del served.parameters[key]
    prefix = f"{version}/"

    def keep(relative: str) -> bool:
        if relative.startswith(prefix):
            return True
        return relative != "config.pbtxt" and not _is_version_file(relative)

    lines = [str(path), served.SerializeToString(deterministic=True).hex()]
    lines.extend(_walk(path, keep))
    return _digest(lines)
