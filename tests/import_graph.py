"""The module import graph of a package, read from its source with `ast` (nothing is imported).

Every `import` and `from ... import` counts, at module level and inside functions alike: an
import moved into a function still ties the two modules together, it only hides the cycle from
Python's start-up.

The sources are parsed in a fresh interpreter (this file run as a script), never in the test
process: CPython 3.11 keeps `ast.parse`'s recursion counter in state shared by all threads, so a
parse while another thread of the test process builds an AST (threads left by earlier tests)
fails at random with "SystemError: AST constructor recursion depth mismatch" (CPython issue
106905; CI hit it once). A child with one thread cannot race.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One imported module: who imports it, where, and whether from inside a function."""

    importer: str
    target: str  # a module of the package, or the dotted name of an outside one
    line: int
    in_function: bool


def module_name(package_root: Path, path: Path) -> str:
    """The dotted module name of `path`, a file under `package_root` (its package's folder)."""
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from` import names (relative imports made absolute)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    # A package's own module is its __init__: a relative import starts from the package itself.
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop] if drop else base
    return ".".join(base + ([node.module] if node.module else []))


@dataclass(frozen=True)
class AttributeUse:
    """One `name.attr` in the source (``yaml.safe_load``): which file, which line."""

    path: str  # relative to the package's folder
    line: int
    dotted: str


def imports(package_root: Path) -> tuple[set[str], list[Import]]:
    """The package's modules and every import statement's targets in them."""
    scan = _scan_in_child(package_root.resolve())
    return set(scan["modules"]), [Import(**imp) for imp in scan["imports"]]


def attribute_uses(package_root: Path) -> list[AttributeUse]:
    """Every `name.attr` expression in the package's modules (a name, then one attribute)."""
    return [AttributeUse(**use) for use in _scan_in_child(package_root.resolve())["attributes"]]


@functools.lru_cache(maxsize=None)
def _scan_in_child(package_root: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, str(package_root)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"parsing {package_root} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def _scan(package_root: Path) -> dict:
    """What the child prints: the modules, their imports and their `name.attr` uses."""
    modules, found, attributes = _parse_package(package_root)
    return {"modules": sorted(modules), "imports": [asdict(imp) for imp in found],
            "attributes": [asdict(use) for use in attributes]}


def _parse_package(package_root: Path) -> tuple[set[str], list[Import], list[AttributeUse]]:
    package = package_root.name
    files = {module_name(package_root, p): p for p in sorted(package_root.rglob("*.py"))}
    found: list[Import] = []
    attributes: list[AttributeUse] = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        attributes += [AttributeUse(str(path.relative_to(package_root)), node.lineno,
                                    f"{node.value.id}.{node.attr}")
                       for node in ast.walk(tree)
                       if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)]
        in_function = {id(node) for func in ast.walk(tree)
                       if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(func)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from pkg import mod` imports the submodule when there is one; else a name in pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == package:
                    # `import a.b.c` imports the deepest module the package has along that path.
                    while target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                if target != name:
                    found.append(Import(name, target, node.lineno, id(node) in in_function))
    return set(files), found, attributes


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """Edges module -> modules of the same package it imports (module level or in functions)."""
    modules, found = imports(package_root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in found:
        if imp.target in modules:
            graph[imp.importer].add(imp.target)
    return graph


def top_level_part(module: str) -> str | None:
    """The top-level module or folder of the package that ``module`` belongs to
    (``pkg.models.zoo`` -> ``models``; None for the package's own ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_graph(graph: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """Edges between the package's top-level modules and folders (a folder is one node), each
    with the module-level edges that make it: ``{"models": {"tracking": ["pkg.models.a ->
    pkg.tracking.b"]}}``."""
    layers: dict[str, dict[str, list[str]]] = {}
    for importer, targets in sorted(graph.items()):
        source = top_level_part(importer)
        if source is None:
            continue
        layers.setdefault(source, {})
        for target in sorted(targets):
            destination = top_level_part(target)
            if destination is not None and destination != source:
                layers[source].setdefault(destination, []).append(f"{importer} -> {target}")
    return layers


def cycles(graph: dict[str, set[str]] | dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def loads_slow(module: str, modules: set[str], found: list[Import], slow: set[str]) -> bool:
    """Whether importing `module` loads one of the `slow` top-level packages at import time
    (through its own module-level imports, its parent packages' and theirs)."""
    top_level: dict[str, set[str]] = {}
    for imp in found:
        if not imp.in_function:
            top_level.setdefault(imp.importer, set()).add(imp.target)
    seen: set[str] = set()
    pending = [module]
    while pending:
        current = pending.pop()
        if current.split(".")[0] in slow:
            return True
        if current in seen or current not in modules:
            continue
        seen.add(current)
        parents = [".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 1)]
        pending += sorted(top_level.get(current, set())) + parents
    return False


if __name__ == "__main__":
    print(json.dumps(_scan(Path(sys.argv[1]))))
