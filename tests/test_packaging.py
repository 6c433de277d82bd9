"""A regular (not editable) ``pip install .`` ships the recipes, Tune spaces and fine-tuning
benchmark specs.

The fresh virtual environment gets the project by a real wheel build and install of a copy of the
checkout; its heavy dependencies (torch, Ray, ...) come from this environment through a ``.pth``
line instead of 5 GB of downloads (``--no-deps --no-build-isolation``). The commands then run
from an unrelated folder without ``PYTHONPATH``, so only the installed package can answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("fresh")
    src = base / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "mlruns", "*.db", ".*_cache"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    # Appended after the new environment's own site-packages: the installed copy comes first.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--ignore-installed", str(src)],
                   check=True, env=env, timeout=600)
    return venv, env


def _run(venv: Path, env: dict[str, str], cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    program = str(venv / "bin" / argv[0]) if argv[0] in ("raytrain-at", "python") else argv[0]
    return subprocess.run([program, *argv[1:]], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd, check=False)


def test_installed_package_is_not_the_checkout(installed, tmp_path) -> None:
    venv, env = installed
    result = _run(venv, env, tmp_path, "python", "-c",
                  "import raytrain_at; print(raytrain_at.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(venv), result.stdout


def test_installed_cli_lists_recipes_and_dry_runs_a_study(installed, tmp_path) -> None:
    venv, env = installed
    recipes = _run(venv, env, tmp_path, "raytrain-at", "recipes")
    assert recipes.returncode == 0, recipes.stderr
    assert "table2_convnext_tiny_cvst_300ep_2step" in recipes.stdout
    tune = _run(venv, env, tmp_path, "raytrain-at", "tune", "--space", "table7_convnext_tiny_stems",
                "--dry-run")
    assert tune.returncode == 0, tune.stderr
    assert "trials: 6" in tune.stdout and str(venv) in tune.stdout  # the packaged space file
    bench = _run(venv, env, tmp_path, "raytrain-at", "finetune-benchmark", "robust_finetune",
                 "--dry-run")
    assert bench.returncode == 0, bench.stderr
    assert "configurations: 180" in bench.stdout and str(venv) in bench.stdout


def test_tune_stem_script_from_the_checkout(installed) -> None:
    """``python tune_stem.py --space tune_spaces/NAME.yaml`` in the checkout, as documented."""
    venv, env = installed
    src = venv.parent / "src"
    result = _run(venv, env, src, "python", "tune_stem.py", "--space",
                  "tune_spaces/quick_stems_cpu.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "trials: 5" in result.stdout
