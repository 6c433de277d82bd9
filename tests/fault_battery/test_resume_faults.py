"""Resume faults, each on a real small run (Ray Train, 2 CPU workers, DeepSpeed, the bundled
digits, MLflow on SQLite): a truncated or pickled checkpoint, a changed config, a non-finite
learning rate or loss, SIGTERM to a worker and to the driver.

The cases share one Ray instance (started with the workers' PID hook) and run in file order:
the first ones extend one run ("battery") epoch by epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raytrain_at.config import load_config
from raytrain_at.errors import RunFailed
from raytrain_at.training.checkpoint_manifest import checkpoint_problem, file_sha256, manifest_name
from raytrain_at.training.launch import launch, prepare_run
from raytrain_at.training.loop import PID_DIR_ENV

FAST = ["data.train_size=512", "data.heldout_size=64", "attack.heldout_steps=2",
        "scaling.max_failures_per_hour=1"]
CLI = [sys.executable, "-m", "raytrain_at.cli"]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-faults")


@pytest.fixture(scope="module")
def pid_dir(place) -> Path:
    folder = place / "pids"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def ray_local(pid_dir):
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {PID_DIR_ENV: str(pid_dir)}})
    yield ray
    ray.shutdown()


def _uri(place: Path) -> str:
    return f"sqlite:///{place}/mlflow.db"


def _prepare(place: Path, name: str, overrides: list[str], allow: set[str] | None = None):
    config = load_config("quickstart", FAST + overrides + [f"tracking.tracking_uri={_uri(place)}"])
    return prepare_run(config, run_name=name, storage_path=str(place / "store"),
                       allow_change=frozenset(allow or ()))


def _run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("quickstart")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], f"tags.`raytrain_at.run_name` = '{name}'")
    assert len(runs) == 1
    return runs[0]


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "train_loss"),
                                   key=lambda m: (m.timestamp, m.step))]


def _checkpoints(place: Path, name: str) -> list[Path]:
    """The run's checkpoints, newest first."""
    folder = place / "store" / "runs" / name
    return sorted((p for p in folder.glob("checkpoint_*") if p.is_dir()), reverse=True)


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def _worker_lines(ray_local, text: str) -> list[str]:
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    return [line for out in session.glob("logs/worker-*.out")
            for line in out.read_text(errors="replace").splitlines() if text in line]


@pytest.fixture(scope="module")
def battery(ray_local, place) -> str:
    """A finished two-epoch run whose checkpoints the next cases damage and extend."""
    result = launch(_prepare(place, "battery", ["schedule.epochs=2"]))
    assert result.error is None and result.metrics["epoch"] == 2
    return "battery"


def test_non_finite_learning_rate_is_refused(tmp_path) -> None:
    """`--set optim.lr=inf`: refused in one line naming optim.lr, exit 2, nothing written."""
    result = subprocess.run(CLI + ["train", "quickstart", "--set", "optim.lr=inf"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env=dict(os.environ, RAYTRAIN_AT_HOME=str(tmp_path / "home")))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lr" in lines[0] and "finite" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_changed_lr_resume_is_refused_on_the_driver(battery, place) -> None:
    """Resume with a changed optim.lr: refused on the driver (one line, old -> new) before
    Ray or any worker starts; the run folder and the MLflow run are unchanged."""
    folder = place / "store" / "runs" / battery
    before = _files(folder)
    result = subprocess.run(
        CLI + ["train", "quickstart", "--run-name", battery, "--storage-path",
               str(place / "store"), "--set", "optim.lr=0.004", "--set", "schedule.epochs=2",
               "--set", f"tracking.tracking_uri={_uri(place)}"]
        + [arg for override in FAST for arg in ("--set", override)],
        capture_output=True, text=True, cwd=place, timeout=180)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: the resumed run's config differs from its checkpoint's "
                     f"({_checkpoints(place, battery)[0]}): optim.lr: 0.002 -> 0.004 (start a "
                     "new run name, or allow it with --allow-change optim.lr)"], lines
    assert _files(folder) == before  # not even console.log: launch() never ran
    run = _run(MlflowClient(_uri(place)), battery)
    assert run.data.params["optim.lr"] == "0.002" and run.info.status == "FINISHED"
    assert not any(key.startswith("raytrain_at.changed.") for key in run.data.tags)


def test_truncated_latest_checkpoint_resumes_from_the_one_before(ray_local, battery,
                                                                 place) -> None:
    """Truncated latest checkpoint: the resume takes the one before, saying so in one line;
    epoch 2 is trained again and the run ends FINISHED with the allowed epoch change tagged."""
    newest, before = _checkpoints(place, battery)[:2]
    shard = newest / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = launch(_prepare(place, battery, ["schedule.epochs=3"], {"schedule.epochs"}))
    assert result.metrics["epoch"] == 3
    client = MlflowClient(_uri(place))
    run = _run(client, battery)
    assert _steps(client, run.info.run_id) == [1, 2, 2, 3]  # epoch 2 again, from epoch 1's
    assert run.info.status == "FINISHED"
    assert run.data.tags["raytrain_at.changed.schedule.epochs"] == "2 -> 3"
    notes = _worker_lines(ray_local, "resuming from the earlier checkpoint")
    assert len(notes) == 1 and str(before) in notes[0] and f"skipped {newest}" in notes[0]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is 1000 bytes" in notes[0], notes


class _Canary:
    """A pickle payload: unpickling it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_canary_in_a_checkpoint_never_runs(battery, place) -> None:
    """Pickle canary in the latest checkpoint (checksums rewritten to match): never executed;
    the resume stops at once in one line naming the file; nothing trained, logged or lost."""
    newest = _checkpoints(place, battery)[0]
    assert checkpoint_problem(newest) is None
    relative = "state/mp_rank_00_model_states.pt"
    marker = place / "canary-ran"
    state = torch.load(newest / relative, weights_only=False)  # written by this test's run
    state["note"] = _Canary(str(marker))
    torch.save(state, newest / relative, _use_new_zipfile_serialization=False)
    manifest = newest / manifest_name(0)
    record = json.loads(manifest.read_text())
    record["files"][relative] = {"size": (newest / relative).stat().st_size,
                                 "sha256": file_sha256(newest / relative)}
    manifest.write_text(json.dumps(record))
    assert checkpoint_problem(newest) is None  # passes its checksums: loading must refuse
    client = MlflowClient(_uri(place))
    artifacts = {a.path for a in client.list_artifacts(_run(client, battery).info.run_id)}
    with pytest.raises(RunFailed) as caught:
        launch(_prepare(place, battery, ["schedule.epochs=4"], {"schedule.epochs"}))
    message = str(caught.value)
    assert "mp_rank_00_model_states.pt" in message and "not retried" in message, message
    assert "\n" not in message
    assert not marker.exists()
    run = _run(client, battery)
    # No worker got as far as reopening the MLflow run: it keeps its finished epochs, with
    # the failed resume's error as a tag.
    assert run.info.status == "FINISHED" and "mp_rank_00" in run.data.tags["raytrain_at.error"]
    assert _steps(client, run.info.run_id) == [1, 2, 2, 3]  # nothing trained, nothing lost
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == artifacts


def test_nan_loss_stops_within_the_epoch_and_keeps_the_last_checkpoint(ray_local,
                                                                       place) -> None:
    """A loss that becomes NaN (resume with an exploding optim.lr): stopped within the epoch in
    one line, not retried, FAILED; the last good checkpoint stays the newest and verifies."""
    result = launch(_prepare(place, "nan", ["schedule.epochs=1"]))
    assert result.metrics["epoch"] == 1
    good = _checkpoints(place, "nan")
    assert len(good) == 1 and checkpoint_problem(good[0]) is None
    files = _files(good[0])
    # AdamW's decoupled decay at lr * weight_decay >> 2 flips and multiplies every weight
    # each step: the weights overflow within a few steps.
    with pytest.raises(RunFailed) as caught:
        launch(_prepare(place, "nan", ["schedule.epochs=2", "optim.lr=1e6"],
                        {"optim.lr", "schedule.epochs"}))
    message = str(caught.value)
    assert "the training loss is" in message and "in epoch 2" in message, message
    assert "not retried" in message and "\n" not in message
    assert _checkpoints(place, "nan") == good and _files(good[0]) == files
    assert checkpoint_problem(good[0]) is None
    client = MlflowClient(_uri(place))
    run = _run(client, "nan")
    assert run.info.status == "FAILED" and "training loss" in run.data.tags["raytrain_at.error"]
    assert _steps(client, run.info.run_id) == [1]
    assert not client.list_artifacts(run.info.run_id, "model")  # nothing selected or logged


def _signal_when(pid_file: Path, signum: int, pid: int | None = None,
                 delay: float = 1.5) -> tuple[threading.Thread, dict[str, int]]:
    sent: dict[str, int] = {}

    def send() -> None:
        deadline = time.time() + 240
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        if pid_file.exists():
            time.sleep(delay)
            sent["pid"] = pid if pid is not None else int(pid_file.read_text())
            os.kill(sent["pid"], signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, sent


def test_sigterm_to_a_worker_leaves_nothing_half_written(ray_local, place, pid_dir) -> None:
    """SIGTERM to a worker mid-epoch (spot reclaim): it is replaced, the run resumes from its
    last checkpoint and ends FINISHED; every checkpoint kept verifies."""
    for old in pid_dir.glob("*.pid"):
        old.unlink()
    thread, sent = _signal_when(pid_dir / "rank1-epoch1.pid", signal.SIGTERM)
    result = launch(_prepare(place, "term-worker", ["schedule.epochs=2"]))
    thread.join(timeout=5)
    assert "pid" in sent, "the worker never reached its second epoch"
    assert result.error is None and result.metrics["epoch"] == 2
    client = MlflowClient(_uri(place))
    run = _run(client, "term-worker")
    assert run.info.status == "FINISHED"
    assert sorted(set(_steps(client, run.info.run_id))) == [1, 2]
    assert all(checkpoint_problem(c) is None for c in _checkpoints(place, "term-worker"))


def test_sigterm_to_the_driver_ends_the_run_killed(ray_local, place, pid_dir) -> None:
    """SIGTERM to the training driver mid-epoch: Ray stops the workers, the MLflow run ends
    KILLED (not RUNNING), one line; the same command resumes and finishes with every epoch."""
    for old in pid_dir.glob("*.pid"):
        old.unlink()
    thread, sent = _signal_when(pid_dir / "rank0-epoch1.pid", signal.SIGTERM, os.getpid())
    with pytest.raises(RunFailed, match=r"^run term-driver stopped by signal 15: the same "):
        launch(_prepare(place, "term-driver", ["schedule.epochs=2"]))
    thread.join(timeout=5)
    assert sent.get("pid") == os.getpid()
    client = MlflowClient(_uri(place))
    run = _run(client, "term-driver")
    assert run.info.status == "KILLED"
    kept = _checkpoints(place, "term-driver")
    assert kept and checkpoint_problem(kept[0]) is None  # epoch 1's, complete
    result = launch(_prepare(place, "term-driver", ["schedule.epochs=2"]))
    assert result.metrics["epoch"] == 2
    run = _run(client, "term-driver")
    assert run.info.status == "FINISHED" and sorted(set(_steps(client, run.info.run_id))) == [1,
                                                                                              2]
