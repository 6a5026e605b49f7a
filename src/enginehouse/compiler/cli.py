"""``enginehouse build`` and ``enginehouse cache``: engines ahead of time, and their cache.

``build`` does what ``serve`` would do at load for every version the version policy
serves, so that a CI job or an image build can leave a warm cache behind; it prints one
row per version and exits non-zero when any build failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import Backend
from enginehouse.compiler import engine as compiler
from enginehouse.compiler.cache import EngineCache, default_root
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


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // max(1, total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
    sys.stderr.flush()


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
    for index, (name, config, backend, version, path, model_dir) in enumerate(plans):
        _progress(index, len(plans), f"{name} v{version}")
        row = BuildRow(name, str(version), backend.name)
        started = time.perf_counter()
        try:
            if not path.is_file():
                raise EnginehouseError(f"model '{name}' version {version}: {path.name} not found")
            backend.check_config(config, path)
            built = compiler.prepare(
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
    _progress(len(plans), len(plans), "done")
    sys.stderr.write("\n")
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


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    build = commands.add_parser("build", help="build engines ahead of time into the cache")
    build.add_argument(
        "--model-repository", "--model-store", action="append", required=True, type=Path
    )
    build.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    build.add_argument("--target", default="cpu", help="cpu or cuda[:N]")
    build.add_argument("--engine-cache", type=Path, default=None)
    build.add_argument("--strict-model-config", action="store_true")
    build.add_argument("--log-verbose", type=int, default=0)
    cache = commands.add_parser("cache", help="list or prune the engine cache")
    cache.add_argument("action", choices=["ls", "prune"])
    cache.add_argument("--engine-cache", type=Path, default=None)
    cache.add_argument(
        "--model-repository",
        action="append",
        default=[],
        type=Path,
        help="locates the default cache beside the repository",
    )
    cache.add_argument(
        "--older-than-days",
        type=float,
        default=None,
        help="prune: only entries unused for this long (default: all)",
    )


def _cache(args: argparse.Namespace) -> EngineCache:
    if args.engine_cache is not None:
        return EngineCache(args.engine_cache)
    return EngineCache(default_root(args.model_repository or [Path.cwd() / "model_repository"]))


def run_build(args: argparse.Namespace) -> int:
    target = "cuda:0" if args.target == "cuda" else args.target
    rows = build_repository(
        args.model_repository, args.model, target, _cache(args), args.strict_model_config
    )
    print_rows(rows)
    return 1 if any(row.error for row in rows) else 0


def run_cache(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if args.action == "ls":
        entries = cache.entries()
        print(f"{cache.root}: {len(entries)} entries")
        print(
            f"{'key':<14} {'backend':<12} {'precision':<9} {'size':>10} {'rel. error':>10} "
            f"{'source':<20} created"
        )
        for entry in entries:
            m = entry.manifest
            print(
                f"{entry.key[:12]:<14} {m.get('backend', ''):<12} {m.get('precision', ''):<9} "
                f"{_size(entry.size):>10} {m.get('max_relative_error', 0):>10.2e} "
                f"{m.get('source', ''):<20} {m.get('created', '')}"
            )
        return 0
    older = args.older_than_days * 86400 if args.older_than_days is not None else None
    removed = cache.prune(older_than_s=older)
    print(f"removed {len(removed)} entries from {cache.root}")
    return 0
