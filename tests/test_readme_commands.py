"""Every project command the README shows runs: its ``--help`` knows each documented option, and
``train`` / ``tune`` lines pass a dry run (the documented command, plus ``--dry-run``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("raytrain-at"))
GROUPS = {"bench", "data", "recipes"}  # commands with sub-commands


def _shell_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _project_commands() -> list[tuple[str, list[str]]]:
    """(kind, argv after the program) for each raytrain-at / tune_stem.py command; commands
    submitted with ``ray job submit ... --`` count too."""
    found = []
    for line in _shell_lines((ROOT / "README.md").read_text()):
        if " -- " in line and line.startswith("ray job submit"):
            line = line.split(" -- ", 1)[1]
        tokens = shlex.split(line.replace("<", "").replace(">", ""))
        if tokens[:1] == ["raytrain-at"]:
            found.append(("cli", tokens[1:]))
        elif tokens[:2] == ["python", "tune_stem.py"]:
            found.append(("tune_stem", tokens[2:]))
    return found


COMMANDS = _project_commands()


def _command_path(args: list[str]) -> list[str]:
    path: list[str] = []
    for token in args:
        if token.startswith("-") or (path and path[0] not in GROUPS) or len(path) == 2:
            break
        path.append(token)
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYTRAIN_AT_DATA="/nonexistent/data")
    if argv[0] == CLI:  # forked from a process that has the heavy imports done
        return run_cli(argv[1:], env=env, cwd=ROOT, timeout=180)
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
                          check=False)


def test_readme_shows_the_main_commands() -> None:
    shown = {" ".join(_command_path(args)) for kind, args in COMMANDS if kind == "cli"}
    assert {"recipes", "train", "tune", "evaluate", "register", "leaderboard"} <= shown, shown
    assert any(kind == "tune_stem" for kind, _ in COMMANDS)


@pytest.mark.parametrize("kind,args", COMMANDS, ids=[" ".join(a)[:60] for _, a in COMMANDS])
def test_documented_options_exist(kind, args) -> None:
    path = ["tune"] if kind == "tune_stem" else _command_path(args)
    result = _run([CLI, *path, "--help"])
    assert result.returncode == 0, result.stderr
    for option in (t.split("=", 1)[0] for t in args if t.startswith("--")):
        assert option in result.stdout, f"{option} is not an option of raytrain-at {path}"


DRY_RUNS = [(kind, args) for kind, args in COMMANDS
            if kind == "tune_stem" or _command_path(args) in (["train"], ["tune"])]


@pytest.mark.parametrize("kind,args", DRY_RUNS, ids=[" ".join(a)[:60] for _, a in DRY_RUNS])
def test_documented_train_and_tune_lines_dry_run(kind, args) -> None:
    argv = ([sys.executable, "tune_stem.py", *args] if kind == "tune_stem" else [CLI, *args])
    if "--dry-run" not in argv:
        argv.append("--dry-run")
    result = _run(argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ray_resources" in result.stdout
