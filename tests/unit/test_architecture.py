"""The shape of the package, read from its source and checked against docs/architecture.md:
every rule the doc states is checked here. The imports of `vnvdimm/` form no cycle at run time;
each module imports only what the doc's rules table lets its room import (the tools' named
exceptions included); the model's modules import only their own layer or the layers above it
(the doc's model table); nothing in `vnvdimm/model/` imports inside a function; the System
reaches no driver; only `fuse/` imports the FUSE binding; and the doc names every module.

Run it alone with `python -m pytest tests/unit/test_architecture.py`; run this file as a
script (`python tests/unit/test_architecture.py`) to print the modules in dependency order.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vnvdimm"
DOC = PACKAGE.parent / "docs" / "architecture.md"
BINDING = "mfusepy"  # the FUSE binding


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


# ---------------------------------------------------------------- the doc's rules


def module_path(mod: str, known: dict[str, Path]) -> str:
    """A module as the doc writes it: its path below vnvdimm/ ("model/disk.py"), a package as
    its directory ("memmap/"; the root package is "")."""
    rel = known[mod].relative_to(PACKAGE).as_posix()
    return rel.removesuffix("__init__.py")


def matches(pattern: str, path: str) -> bool:
    """`pattern` is a file ("daemon.py", "topology/config.py") or a directory ("model/": the
    package and every module below it)."""
    return path.startswith(pattern) if pattern.endswith("/") else path == pattern


def doc_table(first_header: str, text: str | None = None) -> list[list[str]]:
    """The rows of the doc's table whose first column is headed `first_header`, as cells."""
    lines = (DOC.read_text() if text is None else text).splitlines()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    for i, line in enumerate(lines):
        if line.lstrip().startswith("|") and cells(line)[0].lower() == first_header:
            rows = []
            for row in lines[i + 2:]:  # past the header's |---| line
                if not row.lstrip().startswith("|"):
                    break
                rows.append(cells(row))
            return rows
    raise AssertionError(f"{DOC.name} has no table headed {first_header!r}")


def spans(cell: str) -> list[str]:
    """The `code` spans of a table cell or text (fenced blocks left out), without a leading
    vnvdimm/."""
    text = re.sub(r"^\s*```.*?^\s*```", "", cell, flags=re.M | re.S)
    return [s.removeprefix("vnvdimm/") for s in re.findall(r"`([^`\n]+)`", text)]


def rules(text: str | None = None) -> list[tuple[str, list[str], list[str]]]:
    """The doc's rules table: (room, the modules it holds, what they may import)."""
    return [(row[0], spans(row[1]), spans(row[2])) for row in doc_table("room", text)]


def rule_breaks(graph: dict[str, set[str]], known: dict[str, Path],
                table: list[tuple[str, list[str], list[str]]]) -> list[str]:
    """Every import the rules do not allow, and every module no rule holds. A module may import
    the modules of its room(s) and what their rows allow."""
    out = []
    for mod in sorted(graph):
        path = module_path(mod, known) or "__init__.py"
        mine = [(held, allowed) for _, held, allowed in table if any(matches(p, path) for p in held)]
        if not mine:
            out.append(f"{path}: in no room of the rules table")
            continue
        allowed = [p for held, more in mine for p in (*held, *more)]
        for dep in sorted(graph[mod]):
            target = module_path(dep, known) or "__init__.py"
            if not any(matches(p, target) for p in allowed):
                out.append(f"{path} imports {target}")
    return out


def model_layers() -> list[list[str]]:
    """The doc's model table: each layer's modules, as paths below vnvdimm/ (top layer first)."""
    return [["model/" + s for s in spans(row[1])] for row in doc_table("model layer")]


def named(path: str, every: list[str], text: str) -> bool:
    """Whether the doc names the module at `path` by a `span` that is its path or a tail of it
    naming no other module ("disk.py", "commands/dispatch.py", "memmap/")."""
    for s in set(spans(text)):
        if (path == s or path.endswith("/" + s)) and sum(p == s or p.endswith("/" + s) for p in every) == 1:
            return True
    return False


def binding_importers(known: dict[str, Path]) -> list[str]:
    """The modules with an import of the FUSE binding (anywhere in them)."""
    out = []
    for mod, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == BINDING for n in names):
                out.append(module_path(mod, known))
    return sorted(set(out))


def test_every_import_is_one_the_rules_table_allows() -> None:
    """docs/architecture.md's rules table: which room may import which (the tools' named
    exceptions are rows of their own)."""
    known = modules()
    assert rule_breaks(import_graph(), known, rules()) == []


def test_every_module_of_the_rules_table_exists() -> None:
    """A rule naming a module that is gone is a doc behind the code."""
    paths = [module_path(m, modules()) or "__init__.py" for m in modules()]
    stale = [p for _, held, allowed in rules() for p in (*held, *allowed)
             if not any(matches(p, path) for path in paths)]
    assert stale == []


def test_the_model_imports_only_its_own_layer_or_the_layers_above() -> None:
    known = modules()
    graph = import_graph()
    layers_ = model_layers()
    layer_of: dict[str, int] = {}
    for i, layer in enumerate(layers_):
        for mod in known:
            path = module_path(mod, known)
            if path.startswith("model/") and any(matches(p, path) for p in layer):
                assert path not in layer_of, f"{path} is in two layers of the model table"
                layer_of[path] = i
    model = [module_path(m, known) for m in known if module_path(m, known).startswith("model/")]
    assert sorted(set(model) - set(layer_of) - {"model/"}) == [], "modules in no layer of the model table"
    below = []
    for mod in graph:
        path = module_path(mod, known)
        for dep in graph[mod]:
            target = module_path(dep, known)
            if path in layer_of and target in layer_of and layer_of[target] > layer_of[path]:
                below.append(f"{path} (layer {layer_of[path] + 1}) imports {target} (layer {layer_of[target] + 1})")
    assert sorted(below) == []


def test_only_fuse_imports_the_binding() -> None:
    importers = binding_importers(modules())
    assert importers, f"the walk found no import of {BINDING}"
    assert [p for p in importers if not p.startswith("fuse/")] == []


def test_the_doc_names_every_module() -> None:
    known = modules()
    text = DOC.read_text()
    # empty package markers (fuse/__init__.py...) are named by their directory's modules
    every = [module_path(m, known) for m in known if known[m].stat().st_size or known[m].name != "__init__.py"]
    every = [p for p in every if p]
    assert [p for p in every if not named(p, every, text)] == []


def test_the_rule_checks_find_what_they_must() -> None:
    """The checks above can fail: an import no rule allows, a module in no room, an ambiguous
    or missing name."""
    known = {"vnvdimm.a": PACKAGE / "a.py", "vnvdimm.b": PACKAGE / "b.py", "vnvdimm.m": PACKAGE / "m" / "__init__.py",
             "vnvdimm.m.x": PACKAGE / "m" / "x.py", "vnvdimm.n.x": PACKAGE / "n" / "x.py"}
    text = ("| room | modules | may import |\n|---|---|---|\n| low | `m/` | nothing |\n"
            "| high | `a.py` | `m/` |\n")
    table = rules(text)
    assert table == [("low", ["m/"], []), ("high", ["a.py"], ["m/"])]
    assert rule_breaks({"vnvdimm.a": {"vnvdimm.m.x"}, "vnvdimm.m.x": {"vnvdimm.m"}}, known, table) == []
    assert rule_breaks({"vnvdimm.m.x": {"vnvdimm.a"}, "vnvdimm.b": set()}, known, table) == [
        "b.py: in no room of the rules table", "m/x.py imports a.py"]
    every = ["a.py", "m/x.py", "n/x.py"]
    assert named("m/x.py", every, "`m/x.py`") and not named("m/x.py", every, "`x.py`")
    assert named("a.py", every, "see `vnvdimm/a.py`") and not named("a.py", every, "a.py")


if __name__ == "__main__":
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        print("import cycle:", " -> ".join(cycle))
        sys.exit(1)
    for i, layer in enumerate(layers(graph)):
        print(f"{i:2d}  " + "  ".join(layer))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, no cycle")
