"""The package's import graph runs one way: no module imports, even for type checking
only, a module that imports it back (issue 11: context -> engine -> hooks -> context)."""

from __future__ import annotations

import ast
from pathlib import Path

import fidelity_mw

ROOT = Path(fidelity_mw.__file__).parent
PACKAGE = "fidelity_mw"


def _module_name(path: Path) -> tuple[str, list[str]]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (also lazily, also under
    TYPE_CHECKING). `from . import x` counts as importing x, not the package."""
    names = {}
    for path in ROOT.rglob("*.py"):
        name, package = _module_name(path)
        names[name] = (path, package)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in names.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in names else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    # The root package is the public facade (it imports every adapter); a module that
    # reads e.g. `__version__` from it lazily is not part of the layering.
    graph.pop(PACKAGE)
    for deps in graph.values():
        deps.discard(PACKAGE)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
