"""The package's import graph has no cycles (imports inside functions count too)."""

from __future__ import annotations

from pathlib import Path

from import_graph import cycles, import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "raytrain_at"


def test_no_import_cycles_in_the_package() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles (module level or inside functions):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in found)


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from . import a\n")  # imports into the cycle, not part of it
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
