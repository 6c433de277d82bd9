"""Ray Train + DeepSpeed end to end on CPU (gloo, 2 workers, bundled digits): the loss decreases,
the MLflow run holds params, per-epoch metrics and the weights, re-running the same run name
resumes instead of starting over, and a worker killed mid-epoch (by its PID) is replaced and the
run completes from the last checkpoint. Checkpoints are uploaded in the background: every kept
one is complete, the workers' scratch folders are gone, and the selected weights are in the
selected epoch's checkpoint only, which Ray's retention keeps."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from plain_mlflow import artifact_folders

from raytrain_at.config import flatten, load_config
from raytrain_at.training.checkpoint_manifest import checkpoint_problem
from raytrain_at.training.launch import launch, prepare_run
from raytrain_at.training.loop import PID_DIR_ENV

FAST = ["data.train_size=512", "data.heldout_size=64", "attack.heldout_steps=2",
        "scaling.max_failures_per_hour=1"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _run_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def _scratch_folders() -> set[Path]:
    """The workers' checkpoint scratch folders (the workers inherit this TMPDIR)."""
    return set(Path(tempfile.gettempdir()).glob("raytrain-at-ckpt-*"))


def _check_kept_checkpoints(run: Path, selected_epoch: int) -> Path:
    """Every kept checkpoint is complete and none holds a copy of the selected weights; the
    selected epoch's own checkpoint is kept. Returns it."""
    from raytrain_at.training.loop import SELECTED_FILE, STATE_FILE

    kept = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert kept and all(checkpoint_problem(folder) is None for folder in kept), kept
    assert not any((folder / SELECTED_FILE).exists() for folder in kept)
    epochs = {json.loads((folder / STATE_FILE).read_text())["epoch"]: folder for folder in kept}
    assert selected_epoch in epochs, (selected_epoch, epochs)
    return epochs[selected_epoch]


@pytest.mark.slow  # about 110 s; .ci/run runs it after the fast suite
def test_two_worker_run_trains_tracks_and_resumes(ray_local, tmp_path) -> None:
    from safetensors.torch import load_file

    scratch_before = _scratch_folders()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = FAST + ["schedule.epochs=2", f"tracking.tracking_uri={uri}"]
    prepared = prepare_run(load_config("quickstart", overrides), run_name="resume-me",
                           storage_path=str(tmp_path / "store"))
    result = launch(prepared)
    assert result.error is None and result.metrics["epoch"] == 2
    client = MlflowClient(uri)
    run = _run_of(client, "quickstart")
    assert run.info.status == "FINISHED"
    assert set(run.data.params) == set(flatten(prepared.config))
    losses = _history(client, run.info.run_id, "train_loss")
    assert [s for s, _ in losses] == [1, 2] and losses[1][1] < losses[0][1]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {
        "model/model.safetensors", "model/MLmodel"}  # ours, and a plain MLflow model
    # Experiments keep artifacts next to the store, never in Ray's session folder.
    folders = artifact_folders(uri)
    assert folders["quickstart"].is_relative_to(tmp_path), folders
    assert not any("session_" in str(folder) for folder in folders.values()), folders
    assert {m.key for m in client.get_metric_history(run.info.run_id, "heldout_robust_accuracy")}
    # The uploads ran in the background, yet the run waited for them before cleaning up.
    assert _scratch_folders() <= scratch_before
    store = tmp_path / "store" / "runs" / "resume-me"
    _check_kept_checkpoints(store, int(result.metrics["selected_epoch"]))

    # Same run name, one more epoch: resumes at epoch 2 instead of starting over.
    again = prepare_run(load_config("quickstart", FAST + ["schedule.epochs=3",
                                                           f"tracking.tracking_uri={uri}"]),
                        run_name="resume-me", storage_path=str(tmp_path / "store"),
                        allow_change=frozenset({"schedule.epochs"}))
    result = launch(again)
    assert result.metrics["epoch"] == 3
    run = _run_of(client, "quickstart")
    assert [s for s, _ in _history(client, run.info.run_id, "train_loss")] == [1, 2, 3]
    assert run.data.tags["raytrain_at.changed.schedule.epochs"] == "2 -> 3"
    # After the resume, the selected weights are still those of the selected epoch's own
    # checkpoint, whichever epoch that is, and the run logged them as its model.
    selected = int(run.data.tags["raytrain_at.selected_epoch"])
    holder = _check_kept_checkpoints(store, selected)
    logged = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors",
                                            str(tmp_path)))
    expected, got = load_file(str(holder / "model.safetensors")), load_file(str(logged))
    assert expected.keys() == got.keys() and all(v.equal(got[k]) for k, v in expected.items())

    # A truncated newest checkpoint: tests/fault_battery/test_resume_faults.py.


@pytest.mark.slow  # about 70 s; in CI the cluster rehearsal checks the same across nodes
def test_killed_worker_is_replaced_and_run_completes(ray_local, tmp_path, monkeypatch) -> None:
    import ray

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    # Workers must see the PID hook: restart Ray with it in the runtime environment.
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {PID_DIR_ENV: str(pid_dir)}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepared = prepare_run(load_config("quickstart", FAST + ["schedule.epochs=3",
                                                              f"tracking.tracking_uri={uri}"]),
                           run_name="kill-me", storage_path=str(tmp_path / "store"))
    killed: dict[str, int] = {}

    def kill_rank1_in_second_epoch() -> None:
        target = pid_dir / "rank1-epoch1.pid"
        deadline = time.time() + 240
        while not target.exists() and time.time() < deadline:
            time.sleep(0.2)
        if target.exists():
            time.sleep(1.5)  # mid-epoch
            killed["pid"] = int(target.read_text())
            os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank1_in_second_epoch, daemon=True)
    killer.start()
    result = launch(prepared)
    killer.join(timeout=5)
    assert "pid" in killed, "the worker never reached its second epoch"
    assert result.error is None and result.metrics["epoch"] == 3
    # The replacement worker ran the second epoch again from the first epoch's checkpoint.
    assert int((pid_dir / "rank1-epoch1.pid").read_text()) != killed["pid"]
    client = MlflowClient(uri)
    run = _run_of(client, "quickstart")
    steps = [s for s, _ in _history(client, run.info.run_id, "train_loss")]
    assert steps[-1] == 3 and sorted(set(steps)) == [1, 2, 3]
    assert run.info.status == "FINISHED"
