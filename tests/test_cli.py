"""The console script end to end: the quickstart, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli_runner import run_cli

CLI = [str(Path(sys.executable).with_name("raytrain-at"))]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # Forked from a process that has the heavy imports done (tests/support/cli_runner.py); the
    # quickstart below starts the installed script itself.
    return run_cli(args, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=timeout)


@pytest.mark.slow
def test_quickstart_trains_evaluates_registers(tmp_path) -> None:
    """The README's main job (8-9 minutes on 2 cores): adversarial vs clean training, standard
    AutoAttack in three norms, registration and the leaderboard."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYTRAIN_AT_HOME=str(tmp_path / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("COLUMNS", None)  # piped output: the leaderboard is as wide as it needs
    result = subprocess.run(CLI + ["quickstart"], capture_output=True, text=True, timeout=2400,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:6]]
            for line in result.stdout.splitlines() if line.startswith("│")}
    # Training rows: selected epoch ("k/6"), clean and robust accuracy of that epoch.
    adversarial = next(v for k, v in rows.items() if k.startswith("adversarial"))
    clean = rows["clean"]
    assert float(adversarial[2]) > float(clean[2]) + 0.3  # clearly more robust
    assert float(clean[1]) > 0.8 and float(adversarial[1]) > 0.6
    assert all(1 <= int(row[0].split("/")[0]) <= 6 for row in (adversarial, clean))
    # AutoAttack per norm, then the registry: the leaderboard lists the new version.
    for threat in ("linf 8/255", "l2 1", "l1 8"):
        assert any(k.startswith(threat) for k in rows), rows.keys()
    assert "quickstart-convnext-atto-cvst v1" in result.stdout
    assert "champion: linf" in result.stdout
    assert (tmp_path / "mlflow.db").is_file()
    # A quiet console: one screen, no colour codes off a terminal, no traceback, ending with the
    # summary and the `mlflow ui` hint; the workers' full output is kept per run.
    output = result.stdout + result.stderr
    assert output.count("\n") <= 60, output
    assert "\x1b[" not in output and "Traceback" not in output
    assert "mlflow ui" in result.stdout.rstrip().splitlines()[-1]
    logs = sorted((tmp_path / "home" / "runs").glob("quickstart-*/console.log"))
    assert len(logs) == 2 and all("epoch 6/6" in log.read_text() for log in logs)
    _champion_is_durable_and_plain_mlflow(tmp_path)


def _champion_is_durable_and_plain_mlflow(folder: Path) -> None:
    """Every experiment keeps its artifacts in the quickstart's folder, and the champion loads
    with plain MLflow (raytrain_at blocked) predicting what raytrain_at.load_model predicts."""
    import numpy as np
    import torch
    from plain_mlflow import artifact_folders, plain_mlflow_predict

    import raytrain_at

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    for name, location in artifact_folders(uri).items():
        assert location.is_relative_to(folder), (name, location)
    champion = "models:/quickstart-convnext-atto-cvst@champion-linf"
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    by_pytorch, by_pyfunc, _ = plain_mlflow_predict(champion, x, uri, folder / "plain")
    with torch.no_grad():
        ours = raytrain_at.load_model(champion, tracking_uri=uri)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(by_pytorch, ours, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_pyfunc, ours, rtol=1e-5, atol=1e-6)


def test_models_table_matches_table14() -> None:
    result = _run("models")
    assert result.returncode == 0, result.stderr
    for name in ("convnext_tiny_cvst", "vit_base_cvst", "convnext_iso_small", "table8:C2"):
        assert name in result.stdout


def test_inspect_reports_a_stem_variant() -> None:
    result = _run("inspect", "convnext_tiny", "--stem", "table7:5", "--resolution", "64",
                  "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["stem"] == "table7:5" and info["stem_spec"] == "k5s2c48LG-k3s2cDLG"


@pytest.mark.parametrize("args,fragment", [
    (("inspect", "convnext_tiny_cvst", "--stem", "k3s2c48LG-k3s3cDLG"), "total stride 6"),
    (("inspect", "convnxt_tiny"), "unknown model name 'convnxt_tiny'"),
    (("inspect", "convnext_tiny_cvst", "--weights", "/no/such/file.pth"), "does not exist"),
    (("inspect", "vit_small_cvst", "--resolution", "250"), "not a multiple"),
    (("models", "--resolution", "8"), "--resolution 8"),
])
def test_bad_input_gives_one_line_error(args, fragment) -> None:
    result = _run(*args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "Traceback" not in result.stderr


def test_checkpoint_that_does_not_fit_gives_one_line_error(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "resnet.safetensors"
    save_file(other.state_dict(), str(path))
    result = _run("inspect", "convnext_tiny_cvst", "--weights", str(path), "--resolution", "32")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no parameters in common" in result.stderr
