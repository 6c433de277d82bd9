"""Issue 28: ``scripts/`` holds the set-up and cluster shell scripts only, and stays small; the
benchmarks are the package's ``raytrain-at bench`` and the test helpers live in tests/support/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Issue 28 brought scripts/ under 800 lines; issue 29's cluster registry (credentials, PostgreSQL
# with a private mode for the rehearsal and the battery, hourly dumps) added the head's shell
# steps, its Python moved into the package (registry/store_dumps.py). The GPU check's successor
# (issue 30) is to move gpu_check.sh's logic into the package and bring this back down.
# 2026-12-07 evening: the cluster's pinned GPU stack (gpu_stack.sh, check_driver.sh, setup.sh's
# cluster branch, node_env.sh's NCCL/EFA settings) added about 100 lines of node set-up.
LINES_LIMIT = 1050


def test_scripts_are_shell_scripts_under_the_line_limit() -> None:
    files = sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file()
                   and "__pycache__" not in p.parts)
    assert files, "scripts/ is empty"
    assert [p.relative_to(ROOT) for p in files if p.suffix != ".sh"] == []
    lines = sum(len(p.read_text().splitlines()) for p in files)
    assert lines < LINES_LIMIT, f"scripts/ holds {lines} lines"
