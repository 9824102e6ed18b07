"""The shape of the package, read from its source: no import cycle, no module over 400 lines, and no
module of cmboost imported inside a function (the way a cycle is usually hidden)."""

from __future__ import annotations

import ast
from pathlib import Path

import cmboost

ROOT = Path(cmboost.__file__).parent
MAX_LINES = 400
# Function-level imports of cmboost's own modules that are there for a reason other than a cycle.
LAZY_ON_PURPOSE = {
    # the console script imports the parser (and torch) inside main, so that Ctrl-C while loading is one line
    ("cmboost.cli", "cmboost.cli._app"),
    # `import cmboost` stays light for the same reason: the API (and torch) loads with its first use
    ("cmboost", "cmboost.api"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The cmboost modules an import statement loads (a name imported from a package may be a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not MODULES[module].name == "__init__.py":
                base = base[:-1]
            base = base[:len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix for alias in node.names]
    found = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != module:
            found.append(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Every module's imports of other cmboost modules, wherever they stand, and those inside a function."""
    edges = {name: set() for name in MODULES}
    inside = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name].update(imported(name, node))
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inside += [(name, target, node.lineno) for target in imported(name, node)]
    return edges, inside


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules in a cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_counting_imports_inside_functions():
    edges, _ = import_graph()
    assert sum(map(len, edges.values())) > 100  # the graph was read
    assert cycles(edges) == []


def test_no_module_of_cmboost_is_imported_inside_a_function():
    _, inside = import_graph()
    assert [(m, t, line) for m, t, line in inside if (m, t) not in LAZY_ON_PURPOSE] == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_says_what_it_holds():
    for name, path in MODULES.items():
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and "TODO" not in docstring, name
