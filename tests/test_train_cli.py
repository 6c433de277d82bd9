"""`raytrain-at train` refuses bad input with one line, before Ray or any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli_runner import run_cli

CLI = str(Path(sys.executable).with_name("raytrain-at"))


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAYTRAIN_AT_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    env.pop("NOPE_DATA", None)
    return run_cli(["train", *args], env=env, cwd=tmp_path, timeout=180)


@pytest.mark.parametrize("args,fragment", [
    (("quickstart", "--set", "optim.lrr=1"), "unknown config key 'optim.lrr'"),
    (("quickstart", "--set", "optim.lr=-1"), "config key 'optim.lr'"),
    (("quickstart", "--set", "attack.norm=l3"), "config key 'attack.norm'"),
    (("quickstart", "--set", "schedule.global_batch_size=63"), "not divisible"),
    (("no_such_recipe",), "unknown recipe 'no_such_recipe'"),
    (("missing.yaml",), "recipe file 'missing.yaml' does not exist"),
    (("quickstart", "--set", "data.train=/no/such/train.beton"), "does not exist"),
    (("quickstart", "--set", "data.train=$NOPE_DATA/train.beton"), "$NOPE_DATA"),
    (("quickstart", "--set", "model.stem=k3s2c20LG-k3s3cDLG"), "total stride 6"),
    (("quickstart", "--set", "model.num_classes=5"), "has label 9"),
])
def test_bad_input_stops_before_workers(tmp_path, args, fragment) -> None:
    started = time.perf_counter()
    result = _train(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, lines
    assert not (tmp_path / "home" / "runs").exists()  # no run was started
    assert time.perf_counter() - started < 120


def test_unreadable_checkpoint_stops_before_workers(tmp_path) -> None:
    garbage = tmp_path / "init.safetensors"
    garbage.write_bytes(b"\x00\x01 not safetensors")
    result = _train(tmp_path, "quickstart", "--set", f"model.init={garbage}")
    assert result.returncode == 2
    assert "cannot be read as weights" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "home" / "runs").exists()


def test_unwritable_storage_root_stops_before_workers(tmp_path) -> None:
    (tmp_path / "a-file").write_text("x")  # a folder under a file cannot be made, even by root
    result = _train(tmp_path, "quickstart", "--storage-path", str(tmp_path / "a-file" / "runs"))
    assert result.returncode == 2, result.stderr[-500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a-file/runs cannot be created" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert (tmp_path / "a-file").read_text() == "x"


def test_preflight_runs_by_default_on_a_cluster_only() -> None:
    from raytrain_at.cli import preflight_wanted

    assert preflight_wanted(None, address="auto", single_process=False)
    assert not preflight_wanted(None, address=None, single_process=False)
    assert not preflight_wanted(False, address="auto", single_process=False)
    assert preflight_wanted(True, address=None, single_process=False)
    assert not preflight_wanted(True, address="auto", single_process=True)


def test_cloud_storage_path_stays_a_uri(tmp_path, monkeypatch) -> None:
    """`--storage-path s3://...` (the cluster's checkpoints) is handed to Ray as a URI; the
    bundled data goes to the local home. The bucket must exist (an S3 store on 127.0.0.1)."""
    from raytrain_at.config import load_config
    from raytrain_at.training.launch import prepare_run
    from tests.s3_store import object_store

    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(tmp_path))
    with object_store(bucket="bucket"):
        prepared = prepare_run(load_config("quickstart"), run_name="cloud",
                               storage_path="s3://bucket/ray-results/")
    assert prepared.storage_path == "s3://bucket/ray-results/runs"
    assert Path(prepared.train_path).is_relative_to(tmp_path)


def test_failed_run_is_one_line_with_the_log(tmp_path, monkeypatch, capsys) -> None:
    """A run Ray gives up on (here: the node ran out of memory) ends in one line that says why and
    where the workers' output is, exit 1, no traceback and no hundred lines of Ray's tables."""
    import ray.train

    from raytrain_at import cli
    from raytrain_at.training import launch as launch_module

    class OutOfMemoryTrainer:  # what TorchTrainer.fit raises when the memory monitor kills workers
        def fit(self):
            raise ray.train.ControllerError(RuntimeError(
                "4 worker(s) were killed due to the node running low on memory.\n"
                + "\n".join(f"actor table row {i}" for i in range(80))))

    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAYTRAIN_AT_STORAGE", str(tmp_path / "storage"))  # no Ray to ask
    monkeypatch.setattr(launch_module, "build_trainer", lambda prepared: OutOfMemoryTrainer())
    monkeypatch.setattr(launch_module, "init_ray", lambda address=None: None)  # no Ray needed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "quickstart", "--set", "schedule.epochs=1"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "running low on memory" in lines[0] and "console.log" in lines[0]
    assert "Traceback" not in err and "actor table row 5" not in err
