"""The package's import graph: acyclic, layered, and no private names across modules.

Walks every module of ``pyvene_plot`` with :mod:`ast` (module-level and function-level imports,
``TYPE_CHECKING`` blocks included) and fails on

- any cycle between modules;
- any cycle between the package's areas (``data``, ``models``, ``localize``, ...), so a lower layer
  never imports a higher one, even through a function-level import;
- any import of a ``_private`` name from another module.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path


import pyvene_plot

ROOT = Path(pyvene_plot.__file__).parent
PKG = "pyvene_plot"
#: modules kept only so pyvene configs saved under the old flat layout still load
COMPAT = {"pyvene_plot.ablation"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, Path]):
    """Yield ``(importer, imported module, imported name or None)`` for every import in the package."""
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PKG):
                        yield mod, a.name, None
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node)
                if not target.startswith(PKG):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # ``from . import tasks`` imports a module
                        yield mod, sub, None
                    else:
                        yield mod, target, a.name


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def _area(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return PKG
    if parts[1] == "methods" and len(parts) > 2:
        return ".".join(parts[1:3]).removesuffix(".py")
    return parts[1]


def test_module_graph_is_acyclic():
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in _imports(mods):
        if dst in mods and dst != src and not src.startswith(dst + "."):
            # a package's own ``__init__`` runs before its children: an import of the parent
            # package from a child is an import of names the parent already holds
            graph[src].add(dst)
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_areas_are_layered():
    """Collapse modules to their area (``localize``, ``progressive``, ``methods.ablation``, ...)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in _imports(mods):
        if src in COMPAT or dst not in mods:
            continue
        a, b = _area(src), _area(dst)
        if a != b and a != PKG:
            graph[a].add(b)
    cycle = _find_cycle(graph)
    assert cycle is None, f"areas import each other: {' -> '.join(cycle)}"


def test_no_private_names_across_modules():
    mods = _modules()
    bad = []
    for src, dst, name in _imports(mods):
        if name is not None and name.startswith("_") and not name.startswith("__") and dst != src:
            bad.append(f"{src} imports {dst}.{name}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checker_sees_a_cycle():
    """The cycle finder itself can fail (a test that cannot fail proves nothing)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None




def test_import_is_lazy_for_heavy_optional_parts():
    """``import pyvene_plot`` does not build tasks or import L3D, toys or the LM loaders' dependencies."""
    import subprocess
    import sys

    code = (
        "import sys, pyvene_plot as pp\n"
        "heavy = ['pyvene_plot.tasks', 'pyvene_plot.methods.l3d', 'pyvene_plot.methods.toys', 'gguf']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
        "pp.L3D, pp.toys, pp.tasks.names()\n"
        "print(','.join(m for m in heavy[:3] if m not in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "", f"imported eagerly: {out[0]}"
    assert out[1] == "", f"not importable lazily: {out[1]}"
