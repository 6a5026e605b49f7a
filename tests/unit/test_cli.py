"""The command line behaves like a Unix tool: help for every flag with its default, quiet in
a pipe, refusals that say what to give, JSON for scripts, documented exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from make_repository import make_repository

from enginehouse.cli import build_parser

CLI = [sys.executable, "-m", "enginehouse.cli"]


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_every_flag_has_help() -> None:
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
                continue
            assert action.help and action.help != argparse.SUPPRESS, (prog, action.dest)


def test_help_shows_defaults_and_no_promises() -> None:
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    assert "to come" not in top
    for command in ("serve", "build", "cache"):
        assert command in top
    serve = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True).stdout
    assert "(default: 127.0.0.1)" in serve
    assert "$ENGINEHOUSE_CACHE" in serve


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repository(tmp_path_factory.mktemp("cli") / "repo", with_torch=False)
    result = subprocess.run(
        [*CLI, "build", "--model-repository", str(repo), "--model", "simple", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["model"], r["version"], r["cache"]) for r in rows] == [("simple", "1", "built")]
    return repo


def cli(*args: str, check: bool = True, **options: object) -> subprocess.CompletedProcess[str]:
    """``enginehouse ARGS``, its output captured as text."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        check=check,
        **options,  # type: ignore[call-overload]
    )


def test_cache_ls_shows_what_each_entry_is(built: Path) -> None:
    entries = json.loads(cli("cache", "ls", "--model-repository", str(built), "--json").stdout)[
        "entries"
    ]
    assert [(e["model"], e["version"], e["target"], e["precision"]) for e in entries] == [
        ("simple", 1, "cpu", "fp32")
    ]
    table = cli("cache", "ls", "--model-repository", str(built)).stdout
    assert "simple" in table.splitlines()[2]


def test_a_closed_output_ends_the_command_quietly(built: Path) -> None:
    """As when piped into ``head``: the reader goes away before the command writes."""
    process = subprocess.Popen(
        [*CLI, "cache", "ls", "--model-repository", str(built)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # long before the command has imported enough to write
    _, errors = process.communicate(timeout=60)
    assert b"Traceback" not in errors and b"BrokenPipe" not in errors, errors
    assert process.returncode in (0, -13)  # SIGPIPE ends it, as it ends any Unix tool


def test_cache_needs_a_cache_and_prune_a_criterion(built: Path, tmp_path: Path) -> None:
    nowhere = cli(
        "cache",
        "ls",
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "ENGINEHOUSE_CACHE"},
    )
    assert nowhere.returncode == 2
    assert "--model-repository or --engine-cache" in nowhere.stderr
    refused = cli("cache", "prune", "--model-repository", str(built), check=False)
    assert refused.returncode == 2
    assert "--all" in refused.stderr and "--unused-by" in refused.stderr
    kept = cli("cache", "prune", "--model-repository", str(built), "--unused-by", str(built))
    assert "removed 0 entries" in kept.stdout
    other = make_repository(tmp_path / "other", with_torch=False)
    (other / "simple" / "1" / "model.onnx").write_bytes(b"another model")
    pruned = cli("cache", "prune", "--model-repository", str(built), "--unused-by", str(other))
    assert "removed 1 entries" in pruned.stdout
