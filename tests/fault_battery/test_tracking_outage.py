"""A tracking outage in the middle of a real Ray Train run: the MLflow server (a real ``mlflow
server`` on loopback) is killed once epoch 1 is logged and restarted 30 s later on the same port
and store. Training goes on meanwhile (rank 0 buffers into its journal); afterwards the run is
FINISHED, every epoch's metrics are in MLflow exactly once, and its model is there."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raytrain_at.config import load_config
from raytrain_at.runtime.ports import free_local_port
from raytrain_at.tracking.buffered import JOURNAL_FILE
from raytrain_at.training.checkpoint_manifest import checkpoint_problem
from raytrain_at.training.launch import launch, prepare_run, run_folder
from tests.support.screenshot_registry import MlflowServer

EPOCHS = 4
OUTAGE_S = 30.0
# One worker on the bundled digits; 512 training images, a small held-out attack.
OVERRIDES = ["scaling.num_workers=1", f"schedule.epochs={EPOCHS}", "data.train_size=512",
             "data.heldout_size=64", "attack.heldout_steps=2", "scaling.max_failures_per_hour=0"]
EPOCH_KEYS = ("train_loss", "epoch", "heldout_robust_accuracy", "heldout_clean_accuracy")


@pytest.fixture()
def ray_local():
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class Outage(threading.Thread):
    """Kills the server (SIGKILL to its process group) once the run has logged epoch 1, and
    starts a new one on the same port and store ``OUTAGE_S`` later."""

    def __init__(self, server: MlflowServer, run_name: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.run_name = run_name
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _epoch_one_logged(self, client: MlflowClient) -> bool:
        found = client.get_experiment_by_name("quickstart")
        runs = [] if found is None else client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`raytrain_at.run_name` = '{self.run_name}'")
        return bool(runs) and any(m.step == 1 for m in client.get_metric_history(
            runs[0].info.run_id, "train_loss"))

    def run(self) -> None:
        try:
            client = MlflowClient(self.server.url)
            deadline = time.monotonic() + 600
            while not self._epoch_one_logged(client):
                if self.done.wait(1.0) or time.monotonic() > deadline:
                    return
            proc = self.server.proc
            assert proc is not None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            self.killed_at = time.monotonic()
            time.sleep(OUTAGE_S)
            self.server = MlflowServer(self.server.root, port=self.server.port)
            self.server.start().wait_ready(timeout=120)
            self.back_at = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_mlflow_outage_mid_run(ray_local, tmp_path) -> None:
    """MLflow server killed after epoch 1, back 30 s later: run FINISHED, every epoch logged once

    (and the selected model logged, the latest checkpoint whole, nothing left in the journal).
    """
    server = MlflowServer(tmp_path / "mlflow", port=free_local_port()).start().wait_ready(120)
    outage = Outage(server, "outage")
    try:
        prepared = prepare_run(load_config("quickstart", OVERRIDES + [
            f"tracking.tracking_uri={server.url}"]), run_name="outage",
            storage_path=str(tmp_path / "store"))
        outage.start()
        result = launch(prepared)
        finished_at = time.monotonic()
        outage.done.set()
        outage.join(180)
        assert outage.error is None, outage.error
        assert outage.killed_at is not None and outage.back_at is not None, "no outage happened"
        # The outage overlapped training: the server was killed before the run ended.
        assert outage.killed_at < finished_at
        assert result.error is None and result.metrics["epoch"] == EPOCHS

        client = MlflowClient(outage.server.url)
        experiment = client.get_experiment_by_name("quickstart")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, [r.info.run_name for r in runs]
        run = runs[0]
        assert run.info.status == "FINISHED"
        for key in EPOCH_KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
        step_losses = [m.step for m in client.get_metric_history(run.info.run_id, "step_loss")]
        assert step_losses and len(step_losses) == len(set(step_losses))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert {"model/model.safetensors", "model/MLmodel"} <= artifacts
        assert run.data.tags["raytrain_at.selected_epoch"] == str(
            int(result.metrics["selected_epoch"]))
        # The latest checkpoint is whole, and nothing is left undelivered.
        assert result.checkpoint is not None
        with result.checkpoint.as_directory() as folder:
            assert checkpoint_problem(Path(folder)) is None
        assert not (run_folder(prepared) / JOURNAL_FILE).exists()
        console = (run_folder(prepared) / "console.log").read_text()
        assert "does not answer" in console and "answers again" in console
    finally:
        outage.done.set()
        outage.join(120)
        outage.server.stop()
        server.stop()
