"""The packages' imports point one way: no module, through any chain of imports, imports itself.

The graph is read from the source with ``ast``, imports inside functions included. Importing
``pkg.mod`` runs ``pkg/__init__.py`` first, so an import of a module in another package is also
an edge to that package's ``__init__`` (and its parents'); a module's own package and its
parents are already being imported when it runs, so those edges are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kalm_mlx", "convert")


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module names of every .py file of ``packages`` (a package is named by its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> set[str]:
    """Absolute dotted names a module's import statements name (module or module.attribute)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _packages_above(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module -> modules of ``modules`` that importing it runs (see the module docstring)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        own = set(_packages_above(module)) | ({module} if path.name == "__init__.py" else set())
        targets = set()
        for name in _imported_names(module, path):
            if name in modules:
                targets.add(name)
            targets.update(parent for parent in _packages_above(name) if parent in modules)
        graph[module] = targets - own - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_packages_have_no_import_cycle():
    modules = module_files()
    assert "kalm_mlx.api" in modules and "convert.cli" in modules
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kalm_mlx_never_imports_the_convert_command():
    graph = import_graph(module_files())
    offenders = {m: sorted(t for t in targets if t.split(".")[0] == "convert")
                 for m, targets in graph.items() if m.split(".")[0] == "kalm_mlx"}
    assert not {m: t for m, t in offenders.items() if t}


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        # a -> b -> a through a function-level import
        ({"p/__init__.py": "", "p/a.py": "from . import b\n",
          "p/b.py": "def f():\n    from .a import x\n"}, True),
        # importing p.sub.m runs p/sub/__init__.py, which imports back
        ({"p/__init__.py": "", "p/x.py": "from p.sub.m import y\n", "p/sub/__init__.py": "from ..x import z\n",
          "p/sub/m.py": ""}, True),
        # q imports p, p's __init__ imports q: a circle across packages
        ({"p/__init__.py": "from p import a\n", "p/a.py": "import q.c\n",
          "q/__init__.py": "import p\n", "q/c.py": ""}, True),
        # one direction only
        ({"p/__init__.py": "from .a import f\n", "p/a.py": "from .b import g\n", "p/b.py": "import os\n"}, False),
    ],
)
def test_the_cycle_finder_sees_what_python_runs(tmp_path, files, cycle):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    packages = tuple(sorted({name.split("/")[0] for name in files}))
    found = find_cycle(import_graph(module_files(tmp_path, packages)))
    assert (found is not None) == cycle, found
