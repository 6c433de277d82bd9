"""One MLflow run per training run, written by rank 0 through ``MlflowClient``.

The client API is used instead of MLflow's fluent globals on purpose: fluent ``set_experiment`` in a
Ray driver exports ``MLFLOW_EXPERIMENT_ID`` to every process and misroutes runs, and fluent runs
stay RUNNING when a worker dies. A run is found again by its ``raytrain_at.run_name`` tag, so a
resumed training run (same name) keeps writing to the same MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from raytrain_at.tracking.creator import MLFLOW_USER, run_creator
from raytrain_at.tracking.experiments import ensure_experiment

RUN_NAME_TAG = "raytrain_at.run_name"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else MLflow's own default (a SQLite file in the current
    folder, so ``mlflow ui`` started here shows the runs), as an absolute URI."""
    import mlflow

    from raytrain_at.tracking.experiments import absolute_tracking_uri

    return absolute_tracking_uri(mlflow.get_tracking_uri())


class TrainingRun:
    """An MLflow run for one training run: params, per-epoch metrics, artifacts."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment)
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
            max_results=1)
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            self.run_id = self.client.create_run(
                self.experiment_id, run_name=run_name,
                tags={RUN_NAME_TAG: run_name, MLFLOW_USER: run_creator()}).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params once (a resumed run already has them: MLflow refuses changed values)."""
        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, param_text(v)) for k, v in params.items() if k not in logged]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            target.write_text(text)
            self.client.log_artifact(self.run_id, str(target))

    def log_table(self, columns: dict[str, list[Any]], name: str) -> None:
        """A table artifact MLflow shows as a table (``name`` ends in ``.json``): one list of
        cells per column, all of the same length."""
        self.client.log_table(self.run_id, data=columns, artifact_file=name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def param_text(value: Any) -> str:
    """A param's text as MLflow keeps it: JSON for lists and dicts, at most 6,000 characters."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def find_run_id(tracking_uri: str, experiment: str, run_name: str) -> str:
    """The MLflow run id of the training run named ``run_name`` (its ``raytrain_at.run_name``
    tag) in ``experiment``."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1)
    if not runs:
        raise LookupError(f"no MLflow run named {run_name!r} in experiment {experiment!r}")
    return runs[0].info.run_id


def log_run_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], *,
                    step: int = 0, tags: dict[str, str] | None = None) -> None:
    """Add metrics (and tags) to an existing run, finished or not: e.g. a Tune trial's
    AutoAttack accuracies, measured after its training run ended."""
    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])


def metrics_at_step(tracking_uri: str, run_id: str, keys: list[str], step: int
                    ) -> dict[str, float]:
    """The values of ``keys`` that a run logged at ``step`` (an epoch), where it logged them."""
    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for key in keys:
        at_step = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
        if at_step:
            out[key] = at_step[-1]
    return out


def log_file_to_run(tracking_uri: str, experiment: str, run_name: str, path: str | Path,
                    artifact_path: str | None = None) -> bool:
    """Attach a file to the run named ``run_name`` (found by its tag), from any process.

    Returns:
        False when there is no such run (nothing was logged).
    """
    try:
        run_id = find_run_id(tracking_uri, experiment, run_name)
    except LookupError:
        return False
    MlflowClient(tracking_uri=tracking_uri).log_artifact(run_id, str(path), artifact_path)
    return True
