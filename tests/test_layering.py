"""One arrow between the library and the lab: the library never imports the lab or the command line.

The library is every module of ``sparse_opd_peft/`` except the lab (``sparse_opd_peft/lab/``: toy world, demo,
study, continual experiments) and the command line (``sparse_opd_peft/cli*``), which sits on top of both. The lab
imports the library, never the other way round. The modules are parsed with ``ast`` (nothing is imported), and every
import counts: module level, inside functions, under ``TYPE_CHECKING``, relative ones resolved against the module's
package. The library's own import graph (module -> module) must have no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "sparse_opd_peft"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAB = f"{PACKAGE}.lab"
CLI = f"{PACKAGE}.cli"  # the package sparse_opd_peft.cli, or the modules sparse_opd_peft.cli / cli_*.py

# Cycles in the library's import graph that are known and accepted, each as its modules in sorted order, with why.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_cli(name: str) -> bool:
    return _in(name, CLI) or name.startswith(f"{CLI}_")


def _is_library(name: str) -> bool:
    return not _in(name, LAB) and not _is_cli(name)


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in the file. ``from X import y`` yields ``X.y`` when that is a
    module of the package, else ``X`` (the module, or the package's ``__init__``, that defines ``y``).
    Constant-string ``importlib.import_module`` / ``__import__`` calls count too."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise AssertionError(f"{path}:{node.lineno}: relative import goes above the package")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            if len(submodules) < len(node.names):  # names defined in ``target`` itself (its ``__init__`` for a package)
                out.append((node.lineno, target))
            out += [(node.lineno, sub) for sub in submodules]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


LIBRARY = {name: path for name, path in MODULES.items() if _is_library(name)}


def test_the_split_is_where_the_design_says():
    assert f"{LAB}.toy" in MODULES and f"{LAB}.study" in MODULES and f"{LAB}.demo" in MODULES
    assert f"{LAB}.continual" in MODULES and f"{PACKAGE}.masks.churn" in LIBRARY
    assert _is_package(ROOT / "masks" / "__init__.py")
    for part in ("mask", "rules", "budget", "overlap", "checkpoints", "priors", "predictors", "churn", "subspace"):
        assert f"{PACKAGE}.masks.{part}" in LIBRARY, part
    assert (ROOT / "lab" / "toy" / "shipped_world" / "world.json").is_file()
    assert any(_is_cli(name) for name in MODULES)
    for core in ("tuner", "masks", "opd", "diagnostics", "hub", "model_card", "data"):
        assert f"{PACKAGE}.{core}" in LIBRARY, core


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_never_imports_the_lab_or_the_cli(name):
    path = LIBRARY[name]
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line}: imports {target}"
        for line, target in _imports(name, path)
        if _in(target, LAB) or _is_cli(target)
    ]
    assert not bad, "the library must not import the lab or the command line:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in(n, LAB)))
def test_lab_never_imports_the_cli(name):
    """The command line sits on top of the library and the lab; the lab imports the library only."""
    path = MODULES[name]
    bad = [f"{path.relative_to(ROOT.parent)}:{line}: imports {t}" for line, t in _imports(name, path) if _is_cli(t)]
    assert not bad, "the lab must not import the command line:\n" + "\n".join(bad)


def _library_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in LIBRARY.items():
        graph[name] = {t for _, t in _imports(name, path) if t in LIBRARY and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

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
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_library_import_graph_has_no_cycles():
    """Edges are the explicit imports between library modules (``from pkg import name`` is an edge to ``pkg``'s
    ``__init__``, or to ``pkg.name`` when that is a module). Importing ``pkg.sub`` also runs ``pkg/__init__``; that
    implicit edge is left out, or every package whose ``__init__`` re-exports its submodules would be a cycle."""
    graph = _library_graph()
    found = _cycles(graph)
    cycles = [c for c in found if c not in KNOWN_CYCLES]
    report = []
    for cycle in cycles:
        members = set(cycle)
        edges = sorted(f"{a} -> {b}" for a in cycle for b in graph[a] & members)
        report.append("cycle: " + ", ".join(cycle) + "\n    " + "\n    ".join(edges))
    assert not cycles, "the library's import graph has cycles:\n" + "\n".join(report)
    stale = [c for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"known cycles that no longer exist (remove them from KNOWN_CYCLES): {stale}"


def test_the_checker_sees_what_it_should(tmp_path):
    """The import collector resolves relative imports (in a module and in a package ``__init__``), sees imports inside
    functions and constant ``import_module`` calls, refuses an import above the top package; the cycle finder finds a
    2-cycle and a 3-cycle and nothing else."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    init = pkg / "__init__.py"
    init.write_text("from .mod import f\nfrom .. import __version__, masks\n")
    mod = pkg / "mod.py"
    mod.write_text(
        "import importlib\n"
        "from ..lab.toy import runs, ToyWorld\n"
        "def f():\n"
        "    from .. import cli\n"
        "    return importlib.import_module('sparse_opd_peft.lab.demo')\n"
    )
    # ``from X import y``: the module X.y when there is one, else X (here both: runs is a module, ToyWorld is not)
    assert {t for _, t in _imports(f"{PACKAGE}.sub.mod", mod)} == {
        "importlib",
        f"{LAB}.toy",
        f"{LAB}.toy.runs",
        CLI,
        f"{LAB}.demo",
    }
    assert {t for _, t in _imports(f"{PACKAGE}.sub", init)} == {f"{PACKAGE}.sub.mod", PACKAGE, f"{PACKAGE}.masks"}
    mod.write_text("def f():\n    from .... import x\n")
    with pytest.raises(AssertionError, match="above the package"):
        _imports(f"{PACKAGE}.sub.mod", mod)
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"e"}, "e": {"f"}, "f": {"d"}}
    assert _cycles(graph) == [("a", "b"), ("d", "e", "f")]
