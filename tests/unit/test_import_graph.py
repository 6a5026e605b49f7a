"""Package dependencies point one way: frontends -> core -> scheduler -> runtime -> backends ->
config / datatypes / errors, the engine builder beside the backends. Read from the source (every
import, at module level or inside a function, but those only for type checking), so that a
cycle fails here before it makes an import order matter."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for inner in ast.walk(child):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the enginehouse modules it imports at run time."""
    modules = {_module_name(p): p for p in (SOURCE / "enginehouse").rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.append(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(import_graph()) == []


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in import_graph().items():
        for target in targets:
            # The top-level package re-exports the public API: it depends on everything and
            # nothing depends on it.
            if _package(module) != _package(target) and module != "enginehouse":
                packages[_package(module)].add(_package(target))
    assert "enginehouse" not in {t for ts in packages.values() for t in ts}
    assert _cycles(packages) == []


# The layers, lowest first: a package imports only packages below it.
LAYERS = [
    "errors",
    "datatypes",
    "messages",
    "version",
    "config",
    "repository",
    "backends",
    "builder",
    "runtime",
    "scheduler",
    "core",
    "observe",
    "frontends",
    "engine_commands",
    "serving",
    "cli",
    "testing",
]


def test_packages_import_only_the_layers_below() -> None:
    rank = {f"enginehouse.{name}": index for index, name in enumerate(LAYERS)}
    upward = []
    for module, targets in import_graph().items():
        source = _package(module)
        if source == "enginehouse":
            continue
        assert source in rank, f"{source} has no place in LAYERS"
        for target in targets:
            if rank[source] < rank[_package(target)]:
                upward.append(f"{module} -> {target}")
    assert upward == []
