"""The package's layout: every module imports on its own in a fresh interpreter, the package-internal import graph
(every import statement, also those inside functions, relative ones resolved) has no cycle, and no module imports a
name only to re-export it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import robustmed_lite

PACKAGE = "robustmed_lite"
ROOT = Path(robustmed_lite.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their ``__init__.py``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported_modules(name: str, path: Path, modules) -> set[str]:
    """The package modules that module ``name`` imports anywhere in its file.

    ``from A import b`` counts as an import of ``A.b`` where that is a module (``from . import ablation``), else of
    ``A``; relative imports are resolved against the module's package.
    """
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c of a package module: its deepest module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE):
                found.add(target)
    return found


def _import_graph() -> dict[str, set[str]]:
    return {name: _imported_modules(name, path, MODULES) for name, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path that returns to its start (``[a, b, a]``), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_imports_in_a_fresh_interpreter():
    """``pkgutil.walk_packages`` finds every module, and each imports (in one fresh interpreter, in walk order)."""
    script = (
        "import importlib, pkgutil, sys, traceback\n"
        "import robustmed_lite\n"
        "failed = []\n"
        "names = [m.name for m in pkgutil.walk_packages(robustmed_lite.__path__, 'robustmed_lite.')]\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-1))\n"
        "print('\\n'.join(names))\n"
        "sys.exit('\\n'.join(failed) if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    walked = set(done.stdout.split())
    assert walked == set(MODULES) - {PACKAGE}, "walk_packages and the files agree on the modules"


def test_the_graph_is_built_from_every_kind_of_import():
    """The graph sees relative imports of modules and names, imports inside functions and absolute imports."""
    graph = _import_graph()
    assert "robustmed_lite.components" in graph["robustmed_lite.method.objectives"]  # from ..components import
    assert "robustmed_lite.cli" in graph["robustmed_lite.__main__"]  # from .cli import main
    # weight_sensitivity imports the metrics inside the function body
    assert "robustmed_lite.evaluation.metrics" in graph["robustmed_lite.method.weight_perturbation"]
    assert all(name in MODULES for targets in graph.values() for name in targets)


def test_relative_imports_resolve_against_the_modules_package(tmp_path):
    """``..`` climbs one package per extra dot; ``from .. import cli`` is the module cli; a name from a module is
    an import of that module; third-party imports are left out."""
    path = tmp_path / "mod.py"
    path.write_text(
        "import numpy\nfrom .. import cli\nfrom .other import f\nimport robustmed_lite.config\n\n\n"
        "def g():\n    from ..data.loaders import x\n"
    )
    names = ["", ".cli", ".config", ".data", ".data.loaders", ".sub", ".sub.mod", ".sub.other"]
    modules = {PACKAGE + n: None for n in names}
    found = _imported_modules(f"{PACKAGE}.sub.mod", path, modules)
    assert found == {f"{PACKAGE}{n}" for n in (".cli", ".sub.other", ".config", ".data.loaders")}


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    """The cycle finder itself: it returns the cycle's path, and None for an acyclic graph."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"a"}}) == ["a", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    """No module imports (directly or through others, at module level or inside a function) a module that imports
    it back."""
    graph = _import_graph()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _reexports(path: Path) -> list[str]:
    """Names a module imports at its top level and uses nowhere but in ``__all__`` (imported to re-export)."""
    tree = ast.parse(path.read_text(), str(path))
    imported = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*" and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    imported[alias.asname or alias.name.split(".")[0]] = node
    exported_lists = [
        node
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        and any(
            isinstance(t, ast.Name) and t.id == "__all__"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    inside_all = {id(n) for node in exported_lists for n in ast.walk(node)}
    used = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and id(node) not in inside_all and not isinstance(node.ctx, ast.Store)
    }
    return sorted(name for name in imported if name not in used)


def test_reexport_finder_sees_a_name_imported_for_all(tmp_path):
    """The re-export finder itself: a name used only in ``__all__`` is a re-export, a name used in code is not."""
    module = tmp_path / "m.py"
    module.write_text("from .a import used, only_exported\n\n__all__ = ['only_exported']\n\nX = used(1)\n")
    assert _reexports(module) == ["only_exported"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_name_only_to_re_export_it(name):
    """Each name has one home: a module imports only what it uses (no ``__all__`` of imported names, no
    ``# noqa: F401`` re-export lines)."""
    path = MODULES[name]
    assert "noqa: F401" not in path.read_text(), f"{name} silences an unused import"
    assert _reexports(path) == [], f"{name} imports these only to re-export them"
