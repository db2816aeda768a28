"""The shape of the package, read from its source: the imports of `vnvdimm/` form no cycle,
and nothing in `vnvdimm/model/` imports inside a function (every dependency of the model is
visible at the top of its module, and runs one way).

Run it alone with `python -m pytest tests/unit/test_architecture.py`; run this file as a
script (`python tests/unit/test_architecture.py`) to print the modules in dependency order.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vnvdimm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs when the module is imported or used: all of them but
    those under `if TYPE_CHECKING:` (annotations only)."""

    def walk(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(sub)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            yield from walk(child)

    yield from walk(tree)


def nested_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports inside a function or class body (module level and `if TYPE_CHECKING:` are fine)."""

    def walk(node: ast.AST, nested: bool) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if nested and isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            scope = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
            yield from walk(child, nested or scope)

    yield from walk(tree, False)


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(mod: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    targets: list[str] = []
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = mod if known[mod].name == "__init__.py" else mod.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        targets = [f"{base}.{alias.name}" for alias in node.names]
        # `from pkg import submodule` needs only the submodule (the package's __init__ runs
        # first in any case, as every submodule's parent); `from pkg import name` needs pkg.
        if any(t not in known for t in targets):
            targets.append(base)
    out = set()
    for target in targets:
        if not target.startswith("vnvdimm"):
            continue
        resolved = _resolve(target, known)
        if resolved is not None and resolved != mod:
            out.add(resolved)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the vnvdimm modules it imports at run time."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in runtime_imports(tree):
            edges |= imported_modules(mod, node, known)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a closed path), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        colour[mod] = GREY
        stack.append(mod)
        for dep in sorted(graph[mod]):
            if colour[dep] == GREY:
                return [*stack[stack.index(dep):], dep]
            if colour[dep] == WHITE and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        colour[mod] = BLACK
        return None

    for mod in sorted(graph):
        if colour[mod] == WHITE and (cycle := visit(mod)) is not None:
            return cycle
    return None


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules by depth: each imports only modules of earlier layers."""
    depth: dict[str, int] = {}

    def level(mod: str) -> int:
        if mod not in depth:
            depth[mod] = 0  # cycles are reported by find_cycle(); don't recurse forever here
            depth[mod] = 1 + max((level(dep) for dep in graph[mod]), default=-1)
        return depth[mod]

    for mod in graph:
        level(mod)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for mod, d in sorted(depth.items()):
        out[d].append(mod)
    return out


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "vnvdimm.model.system" in graph and graph["vnvdimm.model.drivers"], "the walk found the package"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_the_model_imports_nothing_inside_functions() -> None:
    found = []
    for mod, path in modules().items():
        if not mod.startswith("vnvdimm.model"):
            continue
        for node in nested_imports(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, "imports inside functions: " + ", ".join(found)


def test_the_system_imports_no_driver() -> None:
    """The driver core knows buses and drivers only as registered by the topology at boot."""
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            mod = todo.pop()
            if mod == goal:
                return True
            if mod not in seen:
                seen.add(mod)
                todo.extend(graph[mod])
        return False

    assert not reaches("vnvdimm.model.system", "vnvdimm.model.drivers")
    assert reaches("vnvdimm.topology.boot", "vnvdimm.model.drivers")


@pytest.mark.parametrize("source, counted", [
    ("import vnvdimm.a\n", True),
    ("from vnvdimm import a\n", True),
    ("from . import a\n", True),
    ("def f():\n    import vnvdimm.a\n", True),  # runs when f() is called
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vnvdimm.a\n", False),
    ("import os\n", False),
])
def test_the_walk_counts_runtime_imports_only(source: str, counted: bool) -> None:
    known = {"vnvdimm": Path("vnvdimm/__init__.py"), "vnvdimm.a": Path("vnvdimm/a.py"),
             "vnvdimm.b": Path("vnvdimm/b.py")}
    edges: set[str] = set()
    for node in runtime_imports(ast.parse(source)):
        edges |= imported_modules("vnvdimm.b", node, known)
    assert ("vnvdimm.a" in edges) is counted


def test_the_walk_finds_a_cycle_and_a_nested_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("import os\ndef f():\n    from vnvdimm import a\n")
    assert [n.lineno for n in nested_imports(tree)] == [3]


if __name__ == "__main__":
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        print("import cycle:", " -> ".join(cycle))
        sys.exit(1)
    for i, layer in enumerate(layers(graph)):
        print(f"{i:2d}  " + "  ".join(layer))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, no cycle")
