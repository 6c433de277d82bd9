"""The model registry: robust models as MLflow logged models and registered versions.

``register`` logs a model as an MLflow *logged model* (weights as safetensors with their spec, the
evaluation JSON and plots as artifacts; robust accuracies as the logged model's metrics, so they are
searchable numerically; architecture, size and training facts as params; guard outcomes, weights
hash and code version as tags), then registers it as a new version of a registered model. A
version is never overwritten: MLflow numbers them, and a clash between parallel registrations
against one SQLite store is retried.

Aliases ``champion-linf`` / ``champion-l2`` / ``champion-l1`` move to a new version only when it
beats the holder on that threat's robust accuracy at the same radius on the same data; every move
is recorded as a tag of the registered model and printed.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import raytrain_at
from raytrain_at.errors import UserError
from raytrain_at.evaluation.threats import NORMS
from raytrain_at.model_refs import resolve_version, write_mlflow_model
from raytrain_at.tracking.experiments import ensure_experiment
from raytrain_at.tracking.runs import default_tracking_uri

log = logging.getLogger(__name__)

EXPERIMENT = "raytrain-at-registry"
MODEL_TYPE = "raytrain_at.robust_classifier"
THREATS = NORMS
SIZES = {"small": (0.0, 30.0), "medium": (30.0, 80.0), "large": (80.0, float("inf"))}
T = TypeVar("T")


def champion_alias(threat: str) -> str:
    return f"champion-{threat}"


def _retry(action: Callable[[], T], what: str, attempts: int = 40) -> T:
    """Run an MLflow write, retrying the transient clashes of parallel writers on one SQLite
    store (a locked database, or two registrations racing for the same version number)."""
    for attempt in range(attempts):
        try:
            return action()
        except MlflowException as exc:
            text = str(exc).lower()
            transient = ("locked" in text or "unique constraint" in text
                         or "integrity" in text or "already exists" in text and "version" in text)
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(0.05 + random.random() * 0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = raytrain_at.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5,
                                cwd=Path(raytrain_at.__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


@dataclass
class Registration:
    """What ``register`` did."""

    name: str
    version: str
    model_id: str
    run_id: str
    aliases_taken: list[str] = field(default_factory=list)
    alias_notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluationDataset:
    """The data an evaluation ran on, as an MLflow dataset (name, digest, where it lives)."""

    name: str
    digest: str
    source: str
    profile: str

    def entity(self) -> Dataset:
        return Dataset(name=self.name, digest=self.digest, source_type="local",
                       source=self.source, profile=self.profile)


def _experiment_id(client: MlflowClient) -> str:
    return _retry(lambda: ensure_experiment(client, EXPERIMENT), "experiment")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(name, description="robust classifiers (raytrain-at)")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise


def _params_text(params: dict[str, Any]) -> dict[str, str]:
    return {k: ("" if v is None else str(v))[:500] for k, v in params.items()}


class ModelRegistry:
    """Registry operations against one tracking URI (the registry URI is the same)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri,
                                   registry_uri=self.tracking_uri)

    # ------------------------------------------------------------------ register
    def register(self, *, name: str, model_dir: Path, params: dict[str, Any],
                 metrics: dict[str, float], tags: dict[str, str],
                 comparable: dict[str, str], eligible: bool,
                 source_run_id: str | None = None, evaluation_file: Path | None = None,
                 dataset: EvaluationDataset | None = None) -> Registration:
        """Log ``model_dir`` as a logged model and register it as a new version of ``name``.

        Args:
            model_dir: folder with ``model.safetensors``, its MLflow model and the evaluation
                files.
            params: architecture, size, training and evaluation facts.
            metrics: ``clean_acc``, ``robust_acc_<threat>`` ... (fractions).
            tags: weights hash, code version, ``trustworthy`` ...
            comparable: per threat, what must match for two versions to be compared
                (radius and data); stored as version tags.
            eligible: whether the version may take champion aliases (evaluated, trusted).
            source_run_id: the training run that produced the weights. When it is in this
                store, the version, the logged model, the evaluation and its metrics all hang
                off that run; otherwise a ``register`` run of its own carries them.
            evaluation_file: the evaluation result JSON, logged as an artifact of that run.
            dataset: the evaluation data, logged as the run's dataset input; the metrics are
                linked to it.
        """
        client = self.client
        source = self._existing_run(source_run_id)
        if source is not None:
            run_id, experiment, own_run = source.info.run_id, source.info.experiment_id, False
        else:
            experiment = _experiment_id(client)
            run_id = _retry(lambda: client.create_run(
                experiment, run_name=f"register {name}",
                tags={"raytrain_at.registered_model": name}), "run").info.run_id
            own_run = True
        try:
            if own_run:
                _retry(lambda: client.log_batch(run_id, params=[
                    Param(k, v) for k, v in _params_text(params).items()]), "params")
            model = _retry(lambda: client.create_logged_model(
                experiment, name=name, source_run_id=run_id, tags=tags,
                params=_params_text(params), model_type=MODEL_TYPE), "logged model")
            _retry(lambda: client.log_model_artifacts(model.model_id, str(model_dir)),
                   "artifacts")
            link: dict[str, Any] = {}  # dataset_name and dataset_digest, when logged
            if dataset is not None:
                _retry(lambda: client.log_inputs(run_id, datasets=[DatasetInput(
                    dataset.entity(), tags=[InputTag("mlflow.data.context", "evaluation")])]),
                    "dataset")
                link = {"dataset_name": dataset.name, "dataset_digest": dataset.digest}
            if evaluation_file is not None:
                _retry(lambda: client.log_artifact(run_id, str(evaluation_file),
                                                   f"evaluation/{model.model_id}"), "evaluation")
            for key, value in metrics.items():
                _retry(lambda k=key, v=value: client.log_metric(
                    run_id, k, float(v), model_id=model.model_id, **link), "metric")
            _retry(lambda: client.finalize_logged_model(model.model_id, "READY"), "finalize")
            _retry(lambda: _ensure_registered_model(client, name), "registered model")
            version_tags = dict(tags, **{f"comparable.{k}": v for k, v in comparable.items()},
                                **{"raytrain_at.eligible": str(eligible).lower()})
            version = _retry(lambda: client.create_model_version(
                name, source=f"models:/{model.model_id}", run_id=run_id,
                model_id=model.model_id, tags=version_tags), "version")
            if own_run:
                _retry(lambda: client.set_terminated(run_id, "FINISHED"), "run")
        except MlflowException as exc:
            if own_run:
                client.set_terminated(run_id, "FAILED")
            raise UserError(f"MLflow registry at {self.tracking_uri}: "
                            f"{str(exc).splitlines()[0]}") from None
        except BaseException:
            if own_run:
                client.set_terminated(run_id, "FAILED")
            raise
        registration = Registration(name=name, version=str(version.version),
                                    model_id=model.model_id, run_id=run_id)
        if eligible:
            for threat in THREATS:
                key = f"robust_acc_{threat}"
                if key in metrics:
                    self._maybe_take_alias(registration, threat, metrics[key],
                                           comparable.get(threat, ""))
        return registration

    def _existing_run(self, run_id: str | None):
        """The run ``run_id`` if this store has it (a model file may come from another store)."""
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def _maybe_take_alias(self, registration: Registration, threat: str, value: float,
                          comparable: str) -> None:
        alias = champion_alias(threat)
        client = self.client
        try:
            holder = client.get_model_version_by_alias(registration.name, alias)
        except MlflowException:
            holder = None
        if holder is not None:
            held = self.version_metrics(holder).get(f"robust_acc_{threat}")
            if holder.tags.get(f"comparable.{threat}") != comparable:
                registration.alias_notes.append(
                    f"{alias} stays on v{holder.version}: measured at another radius or on "
                    f"other data ({holder.tags.get(f'comparable.{threat}')} vs {comparable})")
                return
            if held is not None and value <= held:
                registration.alias_notes.append(
                    f"{alias} stays on v{holder.version} ({held:.4f} >= {value:.4f})")
                return
        _retry(lambda: client.set_registered_model_alias(registration.name, alias,
                                                         registration.version), "alias")
        previous = f"v{holder.version}" if holder is not None else "nobody"
        note = (f"{alias} moved from {previous} to v{registration.version} "
                f"(robust_acc_{threat} {value:.4f})")
        _retry(lambda: client.set_registered_model_tag(
            registration.name, f"alias_log.{alias}.{int(time.time() * 1000)}", note), "alias log")
        # The Models page lists registered models with their tags: one tag per threat says
        # what the champion holds, where it was measured, so the list itself compares models.
        _retry(lambda: client.set_registered_model_tag(
            registration.name, f"robust_acc_{threat}",
            f"{100 * value:.1f}% (v{registration.version}; {comparable})"), "champion tag")
        registration.aliases_taken.append(alias)
        registration.alias_notes.append(note)
        log.info(note)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def logged_model_id(version) -> str | None:
        """The logged model behind a version (searches leave ``model_id`` empty; the source
        ``models:/<id>`` still names it)."""
        if getattr(version, "model_id", None):
            return version.model_id
        source = version.source or ""
        return source.removeprefix("models:/") if source.startswith("models:/m-") else None

    def version_metrics(self, version) -> dict[str, float]:
        model_id = self.logged_model_id(version)
        if model_id is None:
            return {}
        return {m.key: m.value for m in self.client.get_logged_model(model_id).metrics or []}

    def version_params(self, version) -> dict[str, str]:
        model_id = self.logged_model_id(version)
        if model_id is None:
            return {}
        return dict(self.client.get_logged_model(model_id).params or {})

    def resolve(self, reference: str):
        """The model version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
        return resolve_version(self.client, reference)

    def has_model(self, name: str) -> bool:
        """Whether a registered model of this name exists (with or without versions)."""
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            return False
        return True

    def rows(self, name: str | None = None) -> list[dict[str, Any]]:
        """One row per registered version (all models, or one), with metrics and params."""
        filter_string = f"name = '{name}'" if name else None
        rows = []
        aliases_of: dict[str, dict[str, list[str]]] = {}
        for version in self.client.search_model_versions(filter_string):
            if version.name not in aliases_of:  # searches leave a version's aliases empty
                held: dict[str, list[str]] = {}
                for alias, number in self.client.get_registered_model(
                        version.name).aliases.items():
                    held.setdefault(str(number), []).append(alias)
                aliases_of[version.name] = held
            metrics = self.version_metrics(version)
            params = self.version_params(version)
            aliases = aliases_of[version.name].get(str(version.version), [])
            rows.append({"name": version.name, "version": int(version.version),
                         "aliases": aliases, "metrics": metrics, "params": params,
                         "tags": dict(version.tags or {})})
        return rows

    def search(self, filter_string: str) -> list:
        """Registered robust models matching e.g. ``metrics.robust_acc_linf > 0.4`` (logged
        models live in their training run's experiment, or the registry's own)."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        if not experiments:
            return []
        found = []
        for start in range(0, len(experiments), 100):
            found += [m for m in self.client.search_logged_models(
                experiments[start:start + 100], filter_string=filter_string)
                if m.model_type == MODEL_TYPE]
        return found


def leaderboard_rows(rows: list[dict[str, Any]], threat: str = "linf",
                     size: str | None = None) -> list[dict[str, Any]]:
    """Rows filtered by size class (params in M) and sorted by the threat's robust accuracy."""
    if threat not in THREATS:
        raise UserError(f"unknown threat {threat!r} (known: {', '.join(THREATS)})")
    if size is not None and size not in SIZES:
        raise UserError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    kept = []
    for row in rows:
        params_m = float(row["params"].get("params_m", "nan") or "nan")
        if size is not None:
            low, high = SIZES[size]
            if not low <= params_m < high:
                continue
        kept.append(row)
    key = f"robust_acc_{threat}"
    return sorted(kept, key=lambda r: r["metrics"].get(key, -1.0), reverse=True)


def stage_model_dir(model_file: Path, extra_files: list[Path]) -> Path:
    """A temporary folder to log as a version's artifacts: the model file, its plain-MLflow
    model (``MLmodel``, exported program, signature, input example) and the evaluation files."""
    folder = Path(tempfile.mkdtemp(prefix="raytrain-at-register-")) / "model"
    write_mlflow_model(model_file, folder)
    for path in extra_files:
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    return folder
