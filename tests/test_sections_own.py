"""The section table owns each section: no module of compress/ outside compress/darknet/sections/ branches on a
section's name (a comparison, an `in` test, a dict key, a match case or a collection of section names) or on the
class of a section's torch module (`isinstance(layer, Route)`), and the Darknet core's modules import each
other in one direction only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import compress
from compress.darknet.sections import SECTIONS

ROOT = Path(compress.__file__).parent
TABLE = ROOT / "darknet" / "sections"
NAMES = frozenset({n.lower() for s in SECTIONS.values() for n in (s.name, s.header, *s.aliases) if n})
# The same word meaning something else: (module, string) pairs checked by hand.
NOT_SECTIONS = {("compress/quant/fake_quant.py", "max")}   # an observer's {"min": .., "max": ..} range record
# The torch modules the entries build: isinstance on them stands for "which section is this".
MODULE_CLASSES = frozenset(n.name for f in ("layers.py", "extra_layers.py")
                           for n in ast.walk(ast.parse((ROOT / "darknet" / f).read_text()))
                           if isinstance(n, ast.ClassDef))


def _names(node: ast.AST | None) -> list[ast.Constant]:
    """String constants in a compared expression, or in a tuple/list/set it is compared with."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _names(e)]
    return [node] if isinstance(node, ast.Constant) and isinstance(node.value, str) else []


def _classes(node: ast.AST | None) -> list[ast.AST]:
    """Section module classes named in an isinstance() class argument or a tuple of classes."""
    if isinstance(node, ast.Tuple):
        return [c for e in node.elts for c in _classes(e)]
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return [node] if name in MODULE_CLASSES else []


def _class_name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr


def section_switches(source: str) -> list[tuple[int, str]]:
    """(line, name) of each place `source` branches on a section name or a section module's class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance",
                                                                                             "issubclass"):
            found += [(c.lineno, _class_name(c)) for c in _classes(node.args[1] if len(node.args) > 1 else None)]
            continue
        if isinstance(node, ast.Tuple) and node.elts and len(_classes(node)) == len(node.elts):
            found += [(c.lineno, _class_name(c)) for c in node.elts]   # e.g. _JOINS = (Shortcut, Route)
            continue
        if isinstance(node, ast.Compare):
            consts = [c for e in (node.left, *node.comparators) for c in _names(e)]
        elif isinstance(node, ast.Dict):
            consts = [c for k in node.keys for c in _names(k)]
        elif isinstance(node, ast.MatchValue):
            consts = _names(node.value)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1:
            consts = _names(node)   # a collection made only of section names is a switch table
            if len(consts) < len(node.elts) or not all(c.value.lower() in NAMES for c in consts):
                continue
        else:
            continue
        found += [(c.lineno, c.value) for c in consts if c.value.lower() in NAMES]
    return sorted(set(found))


def _modules() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if TABLE not in p.parents]


def test_detector_catches_the_switches_it_is_for() -> None:
    code = '''
if block.type == "yolo": pass
if b.type in ("route", "shortcut"): pass
if nxt != "Gaussian_yolo" and "conv" == t: pass
RULES = {"maxpool": 1}
match block.type:
    case "upsample": pass
'''
    assert sorted(section_switches(code)) == [(2, "yolo"), (3, "route"), (3, "shortcut"), (4, "Gaussian_yolo"),
                                              (4, "conv"), (5, "maxpool"), (7, "upsample")]
    assert section_switches("PASSENGERS = ('se', 'eca')\nok = isinstance(layer, (MaxPool, nn.Conv2d))\n"
                            "GRID = (layers.Upsample,)\n") == [(1, "eca"), (1, "se"), (2, "MaxPool"), (3, "Upsample")]
    assert section_switches('register_pruner("shortcut")\nx = {"type": "convolutional"}\nw_clip = "max"\n'
                            'W_CLIPS = ("max", "mse")\nisinstance(m, QConvBNAct)\n') == []


def test_no_code_outside_the_table_switches_on_a_section_name() -> None:
    bad = []
    for path in _modules():
        rel = path.relative_to(ROOT.parent).as_posix()
        bad += [f"{rel}:{line}: {name!r}" for line, name in section_switches(path.read_text())
                if (rel, name) not in NOT_SECTIONS]
    assert not bad, "ask the section table (lookup(block).<field>) instead of the name:\n" + "\n".join(bad)


CORE = ("cfg", "block", "geometry", "layers", "extra_layers", "sections")


def _imports(path: Path) -> set[str]:
    """compress.darknet modules `path` imports anywhere (module level, function-local, TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compress.darknet"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("compress.darknet"))
    return out


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_darknet_core_imports_form_no_cycle() -> None:
    """Every import counted: block, geometry <- layers <- extra_layers <- sections/* <- cfg."""
    files = [p for p in sorted((ROOT / "darknet").rglob("*.py")) if p.stem in CORE or TABLE in p.parents
             or p.parent == TABLE]
    mods = {_module_name(p): p for p in files}
    edges = {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + (m,)))
        if m in done:
            return
        for d in sorted(edges[m]):
            visit(d, path + (m,))
        done.add(m)

    for m in sorted(mods):
        visit(m, ())
    assert {"compress.darknet.cfg", "compress.darknet.layers", "compress.darknet.sections.base"} <= set(mods)
