"""The package's layout: no import circle between its modules, no module too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sfdiag"
BENCH = PACKAGE.parent / "bench"
MAX_LINES = 800


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """Every import the module runs (at its top or inside a function), as (module, names);
    not those under ``if TYPE_CHECKING:`` (annotations only: no import at run time)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, [alias.name for alias in child.names]))
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """sfdiag's modules and the sfdiag modules each imports (a name imported from a package
    that is one of its modules counts as that module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(ast.parse(path.read_text(), str(path))):
            if module not in modules:
                continue
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            edges.update(submodules or [module])
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_walk_sees_a_circle_where_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nimport y")
    assert _imports(tree) == [("typing", ["TYPE_CHECKING"]), ("y", [])]


def test_no_import_circle_in_sfdiag():
    """Data flows one way (config -> build -> probe -> verdict -> report; the run beside
    it): no module imports, however late, one that imports it back."""
    graph = import_graph()
    assert "sfdiag.run.watch" in graph and "sfdiag.step_audit.auditor" in graph
    assert circles(graph) == []


@pytest.mark.parametrize("folder", [PACKAGE, BENCH], ids=["sfdiag", "bench"])
def test_no_module_is_over_800_lines(folder):
    long = {
        str(p.relative_to(folder.parent)): n
        for p in folder.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_nothing_points_at_files_users_do_not_have():
    """The repository stands alone: its code, docs and examples name its own docs
    (``docs/contract.md``, ``docs/config.md``), never a file from outside it."""
    root = PACKAGE.parent
    outside = ("CONTRACTS.md", "ALGORITHMS.md", "STYLE.md", "../shared")
    files = [
        path
        for folder in ("sfdiag", "docs", "examples", "bench", "configs")
        for path in (root / folder).rglob("*")
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".c", ".sh"}
    ] + [root / "README.md", root / "Makefile", root / "mkdocs.yml"]
    found = [
        f"{path.relative_to(root)}: {name}"
        for path in files
        for name in outside
        if name in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not found
