"""House rules about the package's shape: no import cycle between modules, no module over 400 lines.

The import graph is read from the source with ``ast`` (nothing is imported), and
counts every import: module level and inside functions alike, because an import
moved into a function hides a cycle from Python without removing it. Imports
under ``if TYPE_CHECKING:`` are not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "respiramfm"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, skip_type_checking: bool = True):
    """Every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (``from pkg import sub`` counts as importing pkg.sub)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names: list[str] = []
            else:
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                bases = [base]
                names = [alias.name for alias in node.names]
            for base in bases:
                if f"{base}.x".split(".")[0] != PACKAGE.name:
                    continue
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
                if subs:
                    targets.update(subs)
                if len(subs) < len(names) or not names:
                    # a plain name from a module or package (or `import a.b.c`): the nearest existing module
                    parts = base.split(".")
                    while parts and ".".join(parts) not in modules:
                        parts.pop()
                    if parts:
                        targets.add(".".join(parts))
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _example_path(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete loop through a component, e.g. ``a -> b -> a``, so the message says where to cut."""
    members = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return " -> ".join(path + [start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # close through any member already on the path
            w = nxt[0]
            return " -> ".join(path[path.index(w):] + [w])
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_package_has_no_import_cycle():
    graph = import_graph(package_modules())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/respiramfm:\n" + "\n".join(
        f"  {', '.join(c)}  (e.g. {_example_path(graph, c)})" for c in cycles)


def test_no_module_is_over_the_line_limit():
    too_long = {name: n for name, path in package_modules().items()
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


# ------------------------------------------------------------------ the checker itself


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return {".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__"): root / rel for rel in files}


def test_checker_sees_function_level_relative_and_submodule_imports(tmp_path):
    pkg = PACKAGE.name
    mods = _write(tmp_path, {
        f"{pkg}/__init__.py": "",
        f"{pkg}/a.py": f"from {pkg}.b import thing\n",
        f"{pkg}/b.py": "def f():\n    from . import c\n",
        f"{pkg}/c.py": f"import {pkg}.a\n",
        f"{pkg}/d.py": (f"from {pkg} import e\nfrom typing import TYPE_CHECKING\n"
                        f"if TYPE_CHECKING:\n    from {pkg} import a\n"),
        f"{pkg}/e.py": "import os\n",
    })
    graph = import_graph(mods)
    assert graph[f"{pkg}.a"] == {f"{pkg}.b"} and graph[f"{pkg}.b"] == {f"{pkg}.c"}
    assert graph[f"{pkg}.c"] == {f"{pkg}.a"}
    assert graph[f"{pkg}.d"] == {f"{pkg}.e"}  # the TYPE_CHECKING import does not count
    cycles = find_cycles(graph)
    assert cycles == [[f"{pkg}.a", f"{pkg}.b", f"{pkg}.c"]]
    assert _example_path(graph, cycles[0]) == f"{pkg}.a -> {pkg}.b -> {pkg}.c -> {pkg}.a"
    graph[f"{pkg}.c"] = set()
    assert find_cycles(graph) == []
