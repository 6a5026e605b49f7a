"""The model repository on disk: which models exist, where, and which versions.

Triton's layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/<file>``.
Several repositories may be given; a model name must be unique across them. Model names
come from clients (URLs, load requests), so :meth:`ModelRepository.locate` is the only way
from a name to a path, and it never leaves the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.errors import InvalidArgumentError, ModelLoadError, NotFoundError

_FORBIDDEN = ("/", "\\", "\x00")


def check_model_name(name: str) -> str:
    """A model name that is safe to join to a repository root, or a 400."""
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in _FORBIDDEN)
        or len(name) > 255
    ):
        raise InvalidArgumentError(f"invalid model name '{name}'")
    return name


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """Where a model lives: its folder and the repository root that holds it."""

    name: str
    root: Path
    path: Path

    def version_dirs(self) -> dict[int, Path]:
        """Numeric sub-folders of the model folder, by version number."""
        found: dict[int, Path] = {}
        try:
            entries = list(self.path.iterdir())
        except OSError:
            return found
        for entry in entries:
            if entry.name.isdigit() and entry.is_dir() and not entry.name.startswith("0"):
                found[int(entry.name)] = entry
        return found


class ModelRepository:
    """One or more repository roots, scanned on demand (the disk is the truth)."""

    def __init__(self, roots: list[Path]) -> None:
        if not roots:
            raise ValueError("at least one model repository is needed")
        self.roots = [root.resolve() for root in roots]
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"model repository {root} is not a directory")

    def model_names(self) -> list[str]:
        """Every model folder in every root, sorted; duplicates across roots are kept once."""
        names: set[str] = set()
        for root in self.roots:
            for entry in root.iterdir():
                if entry.is_dir() and not entry.name.startswith("."):
                    names.add(entry.name)
        return sorted(names)

    def locate(self, name: str) -> ModelLocation:
        """The folder of model ``name``; 404 if absent, 400 if the name is unsafe or ambiguous."""
        check_model_name(name)
        found: list[ModelLocation] = []
        for root in self.roots:
            path = root / name
            if not path.is_dir():
                continue
            resolved = path.resolve()
            if resolved.parent != root:
                raise InvalidArgumentError(f"model '{name}' resolves outside its repository")
            found.append(ModelLocation(name, root, resolved))
        if not found:
            raise NotFoundError(f"model '{name}' is not in the model repository")
        if len(found) > 1:
            roots = ", ".join(str(loc.root) for loc in found)
            raise ModelLoadError(f"model '{name}' is in more than one repository: {roots}")
        return found[0]


def select_versions(policy: mc.ModelVersionPolicy, available: list[int]) -> list[int]:
    """The versions a version policy serves out of those on disk, ascending."""
    ordered = sorted(available)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return ordered
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in ordered if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return ordered[-count:] if count > 0 else []
