"""File overrides of a load request: model files sent by the client instead of read from disk.

Triton's repository API lets ``load`` carry ``file:<version>/<name>`` parameters with the
bytes of model files, together with a ``config`` override. The files are written to a
private staging folder outside the model repository (the repository is never written to),
laid out as a model folder, and the model is loaded from there. The folder lives as long as
the versions loaded from it serve.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath

from enginehouse.errors import InvalidArgumentError
from enginehouse.repository import ModelLocation

MAX_FILES = 64


def _relative(name: str, key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    parts = path.parts
    if (
        not key
        or "\\" in key
        or "\x00" in key
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in parts)
        or len(parts) < 2
        or not parts[0].isdigit()
        or parts[0].startswith("0")
    ):
        raise InvalidArgumentError(
            f"model '{name}': file override 'file:{key}' must name a file inside a version "
            "folder, like 'file:1/model.onnx'"
        )
    return path


def stage(name: str, files: dict[str, bytes]) -> ModelLocation:
    """Write the override files into a fresh staging model folder and return its location."""
    if len(files) > MAX_FILES:
        raise InvalidArgumentError(f"model '{name}': at most {MAX_FILES} file overrides")
    paths = {_relative(name, key): content for key, content in files.items()}
    root = Path(tempfile.mkdtemp(prefix="enginehouse-override-")).resolve()
    model = root / name
    try:
        for relative, content in paths.items():
            target = model.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return ModelLocation(name, root, model)


def discard(location_path: Path | None) -> None:
    """Remove a staging folder (given its model folder); a no-op for repository models."""
    if location_path is not None:
        shutil.rmtree(location_path.parent, ignore_errors=True)
