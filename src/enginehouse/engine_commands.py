"""``enginehouse build`` and ``enginehouse cache``: engines ahead of time, and their cache.

``build`` does what ``serve`` would do at load for every version the version policy
serves, so that a CI job or an image build can leave a warm cache behind; it prints one
row per version and exits non-zero when any build failed.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import Backend
from enginehouse.builder import artifacts
from enginehouse.builder.cache import ENV_VAR, RESOLUTION, CacheEntry, EngineCache, default_root
from enginehouse.core import loader
from enginehouse.errors import EnginehouseError
from enginehouse.repository import ModelRepository


@dataclass(slots=True)
class BuildRow:
    model: str
    version: str
    backend: str = ""
    precision: str = ""
    seconds: float = 0.0
    size: int = 0
    accuracy: str = ""
    cache: str = ""
    error: str = ""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class Progress:
    """Where a long build shows how far it is: a live bar on a terminal, one plain line per
    step in a log or a pipe (a bar's carriage returns make a log unreadable)."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="engine", file=sys.stderr, leave=False)

    def step(self, index: int, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(label)
            self._bar.update(index - self._bar.n)
        else:
            print(f"building {label} ({index + 1}/{self._total})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._total - self._bar.n)
            self._bar.close()


def build_repository(
    repositories: list[Path],
    models: list[str],
    target: str,
    cache: EngineCache,
    strict: bool = False,
) -> list[BuildRow]:
    repository = ModelRepository(repositories)
    names = models or repository.model_names()
    plans: list[tuple[str, mc.ModelConfig, Backend, int, Path, Path]] = []
    rows: list[BuildRow] = []
    for name in names:
        try:
            location = repository.locate(name)
            config, backend, files = loader.prepare_config(location, strict, cache=cache)
        except EnginehouseError as exc:
            rows.append(BuildRow(name, "-", error=exc.message))
            continue
        for version, path in files.items():
            plans.append((name, config, backend, version, path, location.path))
    progress = Progress(len(plans))
    for index, (name, config, backend, version, path, model_dir) in enumerate(plans):
        progress.step(index, f"{name} v{version}")
        row = BuildRow(name, str(version), backend.name)
        started = time.perf_counter()
        try:
            if not path.is_file():
                raise EnginehouseError(f"model '{name}' version {version}: {path.name} not found")
            backend.check_config(config, path)
            built = artifacts.prepare(
                config, backend.name, version, path, model_dir, cache, target, ahead_of_time=True
            )
        except EnginehouseError as exc:
            row.error = exc.message
            rows.append(row)
            continue
        manifest = built.manifest
        row.precision = manifest.get("precision", "source")
        row.seconds = 0.0 if built.hit else time.perf_counter() - started
        row.size = built.path.stat().st_size
        row.accuracy = f"{manifest['max_relative_error']:.2e}" if manifest else "-"
        row.cache = ("hit" if built.hit else "built") if built.entry else "not built"
        rows.append(row)
    progress.close()
    return rows


def print_rows(rows: list[BuildRow]) -> None:
    header = (
        f"{'model':<24} {'ver':>3} {'backend':<12} {'precision':<9} {'seconds':>8} "
        f"{'size':>10} {'rel. error':>10} {'cache':<9}"
    )
    print(header)
    for row in rows:
        if row.error:
            print(f"{row.model:<24} {row.version:>3} FAILED: {row.error}")
            continue
        print(
            f"{row.model:<24} {row.version:>3} {row.backend:<12} {row.precision:<9} "
            f"{row.seconds:8.2f} {_size(row.size):>10} {row.accuracy:>10} {row.cache:<9}"
        )


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def add_model_repository(parser: argparse.ArgumentParser) -> None:
    """``--model-repository`` (alias ``--model-store``, as tritonserver), required and
    repeatable: one definition for every command that reads a repository."""
    parser.add_argument(
        "--model-repository",
        "--model-store",
        action="append",
        required=True,
        type=Path,
        help="model repository folder (repeatable)",
    )


EXIT_CODES = "exit status: 0 done, 1 a model failed to build, 2 bad arguments"


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    build = commands.add_parser(
        "build",
        help="build engines ahead of time into the cache",
        description="Build the engine of every version the version policies serve, as a load "
        f"would, so that serving starts from a warm cache. {RESOLUTION}. {EXIT_CODES}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_repository(build)
    build.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    build.add_argument("--target", default="cpu", help="cpu, or cuda[:N] for that GPU's kind")
    build.add_argument("--engine-cache", type=Path, default=None, help="engine cache folder")
    build.add_argument(
        "--strict-model-config",
        action="store_true",
        help="require config.pbtxt; do not complete configs from model files",
    )
    build.add_argument("--json", action="store_true", help="print the rows as JSON")
    build.add_argument("--log-verbose", type=int, default=0, help="verbosity: 0 quiet, >0 debug")
    cache = commands.add_parser(
        "cache",
        help="list or prune the engine cache",
        description=f"List or prune built engines. {RESOLUTION}. "
        "exit status: 0 done, 2 bad arguments or no cache to act on.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    verbs = cache.add_subparsers(dest="action", required=True)
    listing = verbs.add_parser(
        "ls",
        help="list the entries: model, version, precision, target, size, age, last use",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prune = verbs.add_parser(
        "prune",
        help="remove entries: give --all, --older-than-days N or --unused-by REPO",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for verb in (listing, prune):
        verb.add_argument("--engine-cache", type=Path, default=None, help="engine cache folder")
        verb.add_argument(
            "--model-repository",
            "--model-store",
            action="append",
            default=[],
            type=Path,
            help="model repository whose cache to use (repeatable)",
        )
        verb.add_argument("--json", action="store_true", help="print the entries as JSON")
        verb.add_argument("--log-verbose", type=int, default=0, help="verbosity: >0 debug")
    prune.add_argument("--all", action="store_true", help="remove every entry")
    prune.add_argument(
        "--older-than-days", type=float, default=None, help="remove entries unused for this long"
    )
    prune.add_argument(
        "--unused-by",
        action="append",
        default=[],
        type=Path,
        metavar="REPO",
        help="remove entries built from no model file in these repositories (repeatable)",
    )


def _cache(args: argparse.Namespace) -> EngineCache | None:
    if args.engine_cache is not None:
        return EngineCache(args.engine_cache)
    if args.model_repository or os.environ.get(ENV_VAR):
        return EngineCache(default_root(args.model_repository))
    return None


def run_build(args: argparse.Namespace) -> int:
    target = "cuda:0" if args.target == "cuda" else args.target
    cache = _cache(args)
    assert cache is not None  # --model-repository is required
    rows = build_repository(
        args.model_repository, args.model, target, cache, args.strict_model_config
    )
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print_rows(rows)
    return 1 if any(row.error for row in rows) else 0


def _target(manifest: dict[str, Any]) -> str:
    """The target an entry was built for (entries from before it was recorded: from the
    target fingerprint)."""
    if "engine_target" in manifest:
        return str(manifest["engine_target"])
    fingerprint = manifest.get("target")
    if isinstance(fingerprint, dict):
        return str(fingerprint.get("target", "?"))
    return str(fingerprint or "?")


def _entry_row(entry: CacheEntry, now: float) -> dict[str, Any]:
    m = entry.manifest
    created = m.get("created", "")
    made: float
    try:
        made = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        made = entry.last_used
    return {
        "key": entry.key,
        "model": m.get("model", "?"),
        "version": m.get("version", "?"),
        "backend": m.get("backend", ""),
        "precision": m.get("precision", ""),
        "target": _target(m),
        "size": entry.size,
        "created": created,
        "age_s": round(now - made),
        "last_used_s": round(now - entry.last_used),
        "max_relative_error": m.get("max_relative_error"),
    }


def _source_hashes(repositories: list[Path], cache: EngineCache) -> set[str]:
    """The SHA-256 of every file in every version folder of these repositories."""
    found: set[str] = set()
    repository = ModelRepository(repositories)
    for name in repository.model_names():
        try:
            location = repository.locate(name)
        except EnginehouseError:
            continue
        for folder in location.version_dirs().values():
            for path in folder.rglob("*"):
                if path.is_file():
                    found.add(cache.facts.sha256(path))
    return found


def run_cache(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if cache is None:
        print(
            f"enginehouse cache: which cache? Give --model-repository or --engine-cache "
            f"({RESOLUTION})",
            file=sys.stderr,
        )
        return 2
    now = time.time()
    if args.action == "ls":
        rows = [_entry_row(entry, now) for entry in cache.entries()]
        if args.json:
            print(json.dumps({"cache": str(cache.root), "entries": rows}, indent=2))
            return 0
        print(f"{cache.root}: {len(rows)} entries")
        print(
            f"{'model':<24} {'ver':>3} {'precision':<9} {'target':<8} {'size':>10} "
            f"{'age':>5} {'used':>5} key"
        )
        for row in rows:
            print(
                f"{row['model']:<24} {row['version']!s:>3} {row['precision']:<9} "
                f"{row['target']:<8} {_size(row['size']):>10} {_age(row['age_s']):>5} "
                f"{_age(row['last_used_s']):>5} {row['key'][:12]}"
            )
        return 0
    if not (args.all or args.older_than_days is not None or args.unused_by):
        print(
            "enginehouse cache prune: say what to remove: --all, --older-than-days N or "
            "--unused-by REPO",
            file=sys.stderr,
        )
        return 2
    keep: set[str] | None = None
    if args.unused_by:
        used = _source_hashes(args.unused_by, cache)
        keep = {e.key for e in cache.entries() if e.manifest.get("source_sha256") in used}
    older = args.older_than_days * 86400 if args.older_than_days is not None else None
    removed = cache.prune(older_than_s=older, keep=keep)
    if args.json:
        print(json.dumps({"cache": str(cache.root), "removed": removed}, indent=2))
    else:
        print(f"removed {len(removed)} entries from {cache.root}")
    return 0
