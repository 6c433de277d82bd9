"""The package's import graph: no cycles, between modules or between the top-level folders and
modules (layers), the lowest layers import only what they must, and imports inside functions only
where start-up needs them (imports inside functions count as edges too)."""

from __future__ import annotations

from pathlib import Path

from import_graph import cycles, import_graph, imports, layer_graph, loads_slow

PACKAGE = Path(__file__).resolve().parents[1] / "raytrain_at"

# What a module may import inside a function: packages whose import takes long enough to slow
# `raytrain-at --help` or a light command (measured with `python -X importtime`, 2 CPU cores:
# torch ~3 s, timm ~6 s, sklearn / kornia / pyautoattack ~1.5 s, matplotlib ~0.7 s, scipy ~0.4 s,
# numpy ~0.15 s; pydantic + yaml make the config ~0.1 s), the heavy optional frameworks, and the
# project's modules that load any of them.
SLOW = {"torch", "torchvision", "timm", "kornia", "pyautoattack", "sklearn", "scipy", "matplotlib",
        "imagecorruptions", "numba", "fvcore", "numpy", "cv2", "safetensors", "pydantic", "yaml",
        "ray", "deepspeed", "mlflow", "ffcv", "pyarrow", "boto3", "botocore"}


def test_no_import_cycles_in_the_package() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles (module level or inside functions):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in found)


# The layers at the bottom and the only project modules each may import (besides its own):
# models/ is timm and torch, tracking/ is MLflow; model references join them above both
# (raytrain_at/model_refs.py).
BOTTOM_LAYERS = {"models": {"errors"}, "tracking": {"errors"}}


def test_no_two_top_level_folders_or_modules_import_each_other() -> None:
    layers = layer_graph(import_graph(PACKAGE))
    found = cycles(layers)
    assert not found, "top-level folders / modules that depend on each other:\n" + "\n".join(
        " <-> ".join(cycle) + ": " + "; ".join(
            edge for a in cycle for b in cycle if b in layers[a] for edge in layers[a][b])
        for cycle in found)


def test_bottom_layers_import_only_what_they_may() -> None:
    layers = layer_graph(import_graph(PACKAGE))
    extra = [edge for layer, allowed in BOTTOM_LAYERS.items()
             for target, edges in layers[layer].items() if target not in allowed
             for edge in edges]
    assert not extra, "imports above the bottom layers:\n" + "\n".join(extra)


def test_imports_inside_functions_are_only_for_slow_modules() -> None:
    modules, found = imports(PACKAGE)
    needless = [f"{imp.importer}:{imp.line} imports {imp.target}" for imp in found
                if imp.in_function and not loads_slow(imp.target, modules, found, SLOW)]
    assert not needless, "move these imports to the top of their module:\n" + "\n".join(needless)


def _package(root: Path, sources: dict[str, str]) -> Path:
    for relative, text in sources.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "pkg/__init__.py": "", "pkg/sub/__init__.py": "",
        "pkg/a.py": "from pkg.sub import b\n",
        "pkg/sub/b.py": "def f():\n    from ..c import g\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from . import a\n",  # imports into the cycle, is not part of it
    })
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_the_checker_sees_two_folders_that_import_each_other(tmp_path: Path) -> None:
    """No module cycle, but the folders a/ and b/ depend on each other (and c.py joins in)."""
    package = _package(tmp_path, {
        "pkg/__init__.py": "import pkg.c\n", "pkg/a/__init__.py": "", "pkg/b/__init__.py": "",
        "pkg/a/x.py": "from pkg.b import y\n",
        "pkg/b/y.py": "X = 1\n",
        "pkg/b/z.py": "def f():\n    from pkg.a.w import W\n",
        "pkg/a/w.py": "W = 1\n",
        "pkg/c.py": "from pkg.a import x\n",  # above a/ and b/, part of no cycle
    })
    graph = import_graph(package)
    assert not cycles(graph)
    layers = layer_graph(graph)
    assert layers["a"] == {"b": ["pkg.a.x -> pkg.b.y"]}
    assert layers["b"] == {"a": ["pkg.b.z -> pkg.a.w"]}
    assert layers["c"] == {"a": ["pkg.c -> pkg.a.x"]}
    assert cycles(layers) == [["a", "b"]]


def test_the_checker_tells_slow_imports_from_needless_ones(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "pkg/__init__.py": "", "pkg/heavy/__init__.py": "import torch\n",
        "pkg/heavy/model.py": "X = 1\n",  # light itself, but its package imports torch
        "pkg/light.py": "import json\n",
        "pkg/cli.py": ("def run():\n    import torch\n    from pkg.heavy.model import X\n"
                       "    from pkg import light\n    import json\n"),
    })
    modules, found = imports(package)
    lazy = {imp.target: loads_slow(imp.target, modules, found, SLOW)
            for imp in found if imp.importer == "pkg.cli"}
    assert lazy == {"torch": True, "pkg.heavy.model": True, "pkg.light": False, "json": False}
