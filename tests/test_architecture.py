"""The package architecture, checked from source: no import cycles, imports only go down the floors, and
package `__init__` files only hand names on.

The graph is built from the AST of every module under compress/, so it counts every import: module level,
function-local and `if TYPE_CHECKING:` ones, relative and absolute. A lazy import hides a cycle from Python at
import time but not from the design: two modules that import each other are one module in two files.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "compress"

# Floors from low to high: a module may import its own package and anything on a lower floor, never a higher one.
FLOORS: dict[str, int] = {
    "base": 0, "darknet": 1, "data": 2, "detection": 3, "deploy": 4, "train": 5,
    "prune": 6, "quant": 6, "distill": 6,   # three methods side by side on one floor
    "jobs": 7, "recipe": 8, "cli": 9,
}
# The top package (`compress`, the public `load/save` API) and `python -m compress` may import anything.
UNRESTRICTED = {"compress", "compress.__main__"}
# Imports between the method packages on the shared floor (prune, quant, distill). Today's code has none: QAT,
# pruning and distillation each build on train/ only, and composing them is the jobs/recipe floors' business.
# A new sibling edge has to be added here, with the reason, on purpose.
ALLOWED_SIBLING_EDGES: frozenset[tuple[str, str]] = frozenset()

def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _known(name: str, modules: set[str]) -> str | None:
    """`name` if it is a module, else its longest dotted prefix that is one (`compress.x.attr` -> `compress.x`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """Every compress module `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    found = {_known(t, modules) for t in targets if t == "compress" or t.startswith("compress.")}
    return {t for t in found if t is not None and t != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~150)
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One closed import path through `component`: a -> b -> ... -> a (shortest, from its first module)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def assert_no_cycles(graph: dict[str, set[str]], known: tuple[frozenset[str], ...] = ()) -> None:
    bad = [c for c in cycles(graph) if frozenset(c) not in known]
    assert not bad, "import cycles (every import counts, lazy ones too):\n" + "\n".join(
        " -> ".join(cycle_path(graph, c)) for c in bad)


def floor(module: str) -> str | None:
    return None if module in UNRESTRICTED else module.split(".")[1]


def layer_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs that import upwards, or sideways between method packages without permission."""
    bad = set()
    for a, deps in graph.items():
        fa = floor(a)
        for b in deps:
            fb = floor(b)
            if fa is None or fb is None or fa == fb:
                continue
            if FLOORS[fb] > FLOORS[fa] or (FLOORS[fb] == FLOORS[fa] and (fa, fb) not in ALLOWED_SIBLING_EDGES):
                bad.add((a, b))
    return bad


def init_logic(path: Path) -> list[str]:
    """Statements of a package `__init__` other than a docstring, imports, `__all__` and `__version__`."""
    body = ast.parse(path.read_text()).body
    bad = []
    for i, node in enumerate(body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.List, ast.Tuple,
                                                                                     ast.Constant)):
            names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     if isinstance(t, ast.Name)]
            if names and set(names) <= {"__all__", "__version__"}:
                continue
        bad.append(f"line {node.lineno}: {type(node).__name__}")
    return bad


GRAPH = import_graph()
PACKAGES = sorted(m for m, p in module_files().items() if p.name == "__init__.py")


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Module-level, function-local, TYPE_CHECKING, relative, `from pkg import submodule` and dotted imports."""
    pkg = tmp_path / "compress"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from compress.sub import leaf\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from compress import top\n",
        "sub/rel.py": "def f():\n    from . import leaf\n    from .. import top\n",
        "top.py": "import compress.sub.rel\nfrom compress.sub.leaf import name\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "compress": {"compress.sub.leaf"},
        "compress.sub": set(),
        "compress.sub.leaf": {"compress.top"},
        "compress.sub.rel": {"compress.sub.leaf", "compress.top"},
        "compress.top": {"compress.sub.rel", "compress.sub.leaf"},
    }
    assert cycles(graph) == [["compress.sub.leaf", "compress.sub.rel", "compress.top"]]


def test_the_cycle_check_fails_on_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    with pytest.raises(AssertionError, match="a -> b -> c -> a"):
        assert_no_cycles(graph)
    assert_no_cycles({"a": {"b"}, "b": set(), "d": {"a", "b"}})


def test_the_layer_check_fails_on_an_upward_or_sideways_import():
    graph = {"compress.data.x": {"compress.train.y", "compress.base.z"}, "compress.quant.q": {"compress.prune.p"},
             "compress": {"compress.cli.c"}}
    assert layer_violations(graph) == {("compress.data.x", "compress.train.y"),
                                       ("compress.quant.q", "compress.prune.p")}


def test_no_import_cycles():
    """No cycle anywhere under compress/, lazy imports included."""
    assert_no_cycles(GRAPH)


def test_every_package_has_a_floor():
    assert {floor(m) for m in GRAPH} - {None} <= set(FLOORS)


def test_no_module_imports_a_higher_floor():
    bad = layer_violations(GRAPH)
    order = " < ".join("{prune, quant, distill}" if f == "prune" else f
                       for f in FLOORS if f not in ("quant", "distill"))
    assert not bad, f"imports that go up the floors ({order}):\n" + "\n".join(
        f"{a} -> {b}" for a, b in sorted(bad))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_init_only_hands_names_on(package):
    path = module_files()[package]
    assert not init_logic(path), f"{path} holds logic; move it into a named module: {init_logic(path)}"
