"""The model registry: robust models as MLflow logged models and registered versions.

``register`` logs a model as an MLflow *logged model* (weights as safetensors with their spec, the
evaluation JSON and plots as artifacts; robust accuracies as the logged model's metrics, so they are
searchable numerically; architecture, size and training facts as params; guard outcomes, weights
hash and code version as tags), then registers it as a new version of a registered model. A
version is never overwritten: MLflow numbers them, and a clash between parallel registrations
against one SQLite store is retried.

Aliases ``champion-linf`` / ``champion-l2`` / ``champion-l1`` move to a new version only when it
beats the holder on that norm's robust accuracy at the same radius on the same data; every move
is printed and appended to the model's alias history: one file, ``alias_history.txt``, of the run
``alias history NAME`` in the registry experiment (the model's description shows the latest).

What a person reads in ``mlflow ui`` is written here too (:mod:`raytrain_at.registry.report_card`):
the version's description is its report card; the registered model's description names the
champions above its versions' table, refreshed at every registration; and the description of the
registered model :data:`LEADERBOARD_MODEL` (no versions of its own) is the leaderboard of every
registered version.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import raytrain_at
from raytrain_at.errors import UserError
from raytrain_at.evaluation.threats import NORMS
from raytrain_at.model_refs import find_model_run_id, resolve_version, write_mlflow_model
from raytrain_at.registry.leaderboard_formats import SIZES
from raytrain_at.registry.report_card import (HistoryLink, RunRef, VersionCard,
                                              leaderboard_card, model_card, summary_line,
                                              version_card, with_reevaluation)
from raytrain_at.tracking.experiments import ensure_experiment
from raytrain_at.tracking.redact import without_userinfo
from raytrain_at.tracking.runs import default_tracking_uri

log = logging.getLogger(__name__)

EXPERIMENT = "raytrain-at-registry"
MODEL_TYPE = "raytrain_at.robust_classifier"
# The registered model whose description is the leaderboard of every registered version.
LEADERBOARD_MODEL = "raytrain-at-leaderboard"
# A registered model's alias moves: one text file (oldest first) of one run of the registry
# experiment, the run tagged with the model's name.
ALIAS_HISTORY_FILE = "alias_history.txt"
HISTORY_RUN_TAG = "raytrain_at.alias_history_of"
# Per-move tags of earlier versions (alias_log.<alias>.<ms>), folded into the history.
LEGACY_ALIAS_LOG = "alias_log."
T = TypeVar("T")


def champion_alias(norm: str) -> str:
    return f"champion-{norm}"


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


def _ensure_registered_model(client: MlflowClient, name: str,
                             description: str = "robust classifiers (raytrain-at)") -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(name, description=description)
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
                 dataset: EvaluationDataset | None = None,
                 card: VersionCard | None = None) -> Registration:
        """Log ``model_dir`` as a logged model and register it as a new version of ``name``.

        Args:
            model_dir: folder with ``model.safetensors``, its MLflow model and the evaluation
                files.
            params: architecture, size, training and evaluation facts.
            metrics: ``clean_acc``, ``robust_acc_<norm>`` ... (fractions).
            tags: weights hash, code version, ``trustworthy`` ...
            comparable: per norm, what must match for two versions to be compared
                (radius and data); stored as version tags.
            eligible: whether the version may take champion aliases (evaluated, trusted).
            source_run_id: the training run that produced the weights. When it is in this
                store, the version, the logged model, the evaluation and its metrics all hang
                off that run; otherwise a ``register`` run of its own carries them.
            evaluation_file: the evaluation result JSON, logged as an artifact of that run.
            dataset: the evaluation data, logged as the run's dataset input; the metrics are
                linked to it.
            card: the version's report card without what only registering knows (version,
                ids, runs); filled in and written as the version's description.
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
            raise UserError(f"MLflow registry at {without_userinfo(self.tracking_uri)}: "
                            f"{str(exc).splitlines()[0]}") from None
        except BaseException:
            if own_run:
                client.set_terminated(run_id, "FAILED")
            raise
        registration = Registration(name=name, version=str(version.version),
                                    model_id=model.model_id, run_id=run_id)
        try:
            if eligible:
                for norm in NORMS:
                    key = f"robust_acc_{norm}"
                    if key in metrics:
                        self._maybe_take_alias(registration, norm, metrics[key],
                                               comparable.get(norm, ""))
            if card is not None:
                self._write_version_card(card, registration, experiment, own_run)
                if card.result is not None and tags.get("weights_sha256"):
                    self._mark_reevaluated(registration, tags["weights_sha256"],
                                           summary_line(card.result))
            self.refresh_pages(name)
        except MlflowException as exc:
            raise UserError(f"MLflow registry at {without_userinfo(self.tracking_uri)}: {name} "
                            f"version "
                            f"{registration.version} is registered, but writing its pages "
                            f"failed: {str(exc).splitlines()[0]}") from None
        return registration

    # ------------------------------------------------------------------ pages
    def _write_version_card(self, card: VersionCard, registration: Registration,
                            experiment_id: str, own_run: bool) -> None:
        """Fill in what registering decided (version, ids, runs) and write the card as the
        version's description."""
        run = self._run_ref(registration.run_id)
        lineage = replace(card.lineage, training=None if own_run else run,
                          register_run=run if own_run else None)
        if lineage.init_run is None and (lineage.init or lineage.init_source_run):
            lineage.init_run, lineage.init_is_clean = self._initial_run(
                lineage.init_source_run or lineage.init or "")
        filled = replace(card, name=registration.name, version=registration.version,
                         model_id=registration.model_id, experiment_id=experiment_id,
                         lineage=lineage)
        text = version_card(filled)
        _retry(lambda: self.client.update_model_version(
            registration.name, registration.version, description=text), "description")

    def _mark_reevaluated(self, registration: Registration, weights_sha256: str,
                          summary: str) -> None:
        """Earlier versions of the same weights: their cards point to this evaluation."""
        same = self.client.search_model_versions(
            f"name = '{registration.name}' and tags.weights_sha256 = '{weights_sha256}'")
        for version in same:
            if int(version.version) >= int(registration.version):
                continue
            full = self.client.get_model_version(registration.name, version.version)
            text = with_reevaluation(full.description or "", registration.name,
                                     registration.version, summary, _utc(time.time()))
            _retry(lambda v=version.version, t=text: self.client.update_model_version(
                registration.name, v, description=t), "re-evaluation note")

    def _run_ref(self, run_id: str) -> RunRef | None:
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return RunRef(run_id, run.info.experiment_id, run.info.run_name or run_id)

    def _initial_run(self, reference: str) -> tuple[RunRef | None, bool]:
        """The run a ``model.init`` reference (or a bare run id) names in this store, and
        whether it trained without an attack (a clean pre-training)."""
        run_id: str | None = None
        if reference.startswith("run:"):
            experiment, _, run_name = reference[len("run:"):].partition("/")
            try:
                run_id = find_model_run_id(self.tracking_uri, experiment, run_name)
            except LookupError:
                return None, False
        elif reference.startswith("runs:/"):
            run_id = reference[len("runs:/"):].split("/")[0]
        elif reference.startswith("models:/"):
            try:
                run_id = self.resolve(reference).run_id
            except UserError:
                return None, False
        elif "/" not in reference and reference:
            run_id = reference
        ref = self._run_ref(run_id) if run_id else None
        if ref is None:
            return None, False
        params = self.client.get_run(ref.run_id).data.params
        clean = params.get("objective.kind") == "clean" or params.get("attack.kind") == "none"
        return ref, clean

    def refresh_pages(self, name: str) -> None:
        """Rewrite the registered model's description (champions, versions) and the
        leaderboard model's (every registered version)."""
        rows = self.rows(name)
        run_id = self._history_run(name)
        history = HistoryLink(self.alias_history(name, run_id), artifact_url=(
            f"get-artifact?path={ALIAS_HISTORY_FILE}&run_uuid={run_id}" if run_id else None))
        text = model_card(name, rows, LEADERBOARD_MODEL, history)
        _retry(lambda: self.client.update_registered_model(name, description=text),
               "model description")
        self.refresh_leaderboard()

    def refresh_leaderboard(self) -> None:
        """The leaderboard (best l_inf first) as the description of :data:`LEADERBOARD_MODEL`."""
        text = leaderboard_card(leaderboard_rows(self.rows(), "linf"),
                                "Leaderboard: every registered robust model (raytrain-at)")
        _retry(lambda: _ensure_registered_model(
            self.client, LEADERBOARD_MODEL,
            "the leaderboard of every registered version (raytrain-at)"), "leaderboard model")
        _retry(lambda: self.client.update_registered_model(LEADERBOARD_MODEL, description=text),
               "leaderboard")

    def _existing_run(self, run_id: str | None):
        """The run ``run_id`` if this store has it (a model file may come from another store)."""
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def _maybe_take_alias(self, registration: Registration, norm: str, value: float,
                          comparable: str, rounds: int = 20) -> None:
        """Give ``champion-<norm>`` to the best eligible version, this one included.

        Several processes may register versions of one model against one MLflow server at
        once, and MLflow has no compare-and-set for aliases. So the alias is not moved by a
        single read-compare-set; each registrant instead converges it: read the holder and
        every eligible version comparable with it (same radius, same data) with its metric,
        set the alias to the best of them (a total order: higher metric, then the lower
        version number), and repeat until a fresh read finds the holder already the best.

        Why the last alias write W (by process P) is the best version v: metrics hang off a
        version's logged model before the version exists, and never change. v's registrant
        R made a final, stable read after v was created. If that read came after W, it saw
        W's holder and found it at least as good as v. If it came before W, then P's own
        final read (after W) came after v's creation too, and P found W's holder at least as
        good as v. Either way nobody can leave the alias below a version that exists once
        every registrant has returned.
        """
        alias = champion_alias(norm)
        metric = f"robust_acc_{norm}"
        first_holder: str | None = None
        for _ in range(rounds):
            holder = self._alias_holder(registration.name, alias)
            if first_holder is None:
                first_holder = holder.version if holder is not None else ""
            held_on = holder.tags.get(f"comparable.{norm}") if holder is not None else comparable
            if holder is not None and held_on != comparable:
                registration.alias_notes.append(
                    f"{alias} stays on v{holder.version}: measured at another radius or on "
                    f"other data ({held_on} vs {comparable})")
                return
            best = self._best_version(registration.name, norm, comparable, holder)
            if best is None:
                return
            best_version, best_value = best
            if holder is not None and str(holder.version) == best_version:
                if best_version == registration.version:
                    registration.aliases_taken.append(alias)
                elif str(first_holder) == best_version:
                    held = self.version_metrics(holder).get(metric)
                    registration.alias_notes.append(
                        f"{alias} stays on v{holder.version} ({held:.4f} >= {value:.4f})"
                        if held is not None else f"{alias} stays on v{holder.version}")
                else:
                    registration.alias_notes.append(
                        f"{alias} is on v{best_version}, registered meanwhile ({best_value:.4f})")
                return
            _retry(lambda v=best_version: self.client.set_registered_model_alias(
                registration.name, alias, v), "alias")
            previous = f"v{holder.version}" if holder is not None else "nobody"
            note = f"{alias} moved from {previous} to v{best_version} ({metric} {best_value:.4f})"
            self._record_alias_move(registration.name, note)
            # The Models page lists registered models with their tags: one tag per norm says
            # what the champion holds, where it was measured, so the list itself compares models.
            _retry(lambda v=best_version, b=best_value: self.client.set_registered_model_tag(
                registration.name, metric, f"{100 * b:.1f}% (v{v}; {comparable})"),
                "champion tag")
            if best_version == registration.version:
                registration.alias_notes.append(note)
                log.info(note)
        raise UserError(f"{registration.name}: {alias} did not settle in {rounds} rounds of "
                        "concurrent registrations; register again to re-check it")

    def _alias_holder(self, name: str, alias: str):
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def _best_version(self, name: str, norm: str, comparable: str,
                      holder) -> tuple[str, float] | None:
        """The eligible version of ``name`` with the highest ``robust_acc_<norm>`` measured on
        ``comparable`` (ties: the earlier version), the current holder always a candidate."""
        candidates = {str(v.version): v for v in self.client.search_model_versions(
            f"name = '{name}'")
            if v.tags.get("raytrain_at.eligible") == "true"
            and v.tags.get(f"comparable.{norm}") == comparable}
        if holder is not None:
            candidates.setdefault(str(holder.version), holder)
        scored = [(value, -int(number), number) for number, version in candidates.items()
                  if (value := self.version_metrics(version).get(f"robust_acc_{norm}"))
                  is not None]
        if not scored:
            return None
        value, _, number = max(scored)
        return number, value

    def _record_alias_move(self, name: str, note: str) -> None:
        """Append ``note`` (with its UTC time) to the model's alias history, folding in (and
        deleting) the per-move ``alias_log.<alias>.<ms>`` tags earlier versions wrote."""
        tags = dict(self.client.get_registered_model(name).tags or {})
        legacy = sorted((int(key.rsplit(".", 1)[-1]), value) for key, value in tags.items()
                        if key.startswith(LEGACY_ALIAS_LOG) and key.rsplit(".", 1)[-1].isdigit())
        run_id = self._history_run(name) or self._new_history_run(name)
        lines = self.alias_history(name, run_id)
        lines += [f"{_utc(ms / 1000)}  {value}" for ms, value in legacy]
        lines.append(f"{_utc(time.time())}  {note}")
        _retry(lambda: self.client.log_text(run_id, "\n".join(lines) + "\n",
                                            ALIAS_HISTORY_FILE), "alias history")
        for key in [k for k in tags if k.startswith(LEGACY_ALIAS_LOG)]:
            _retry(lambda k=key: self.client.delete_registered_model_tag(name, k), "alias log")

    def _history_run(self, name: str) -> str | None:
        """The run of the registry experiment that holds ``name``'s alias history."""
        experiment = _experiment_id(self.client)
        found = self.client.search_runs(
            [experiment], filter_string=f"tags.`{HISTORY_RUN_TAG}` = '{name}'", max_results=1)
        return found[0].info.run_id if found else None

    def _new_history_run(self, name: str) -> str:
        experiment = _experiment_id(self.client)
        run_id = _retry(lambda: self.client.create_run(
            experiment, run_name=f"alias history {name}",
            tags={HISTORY_RUN_TAG: name}), "history run").info.run_id
        _retry(lambda: self.client.set_terminated(run_id, "FINISHED"), "history run")
        return run_id

    def alias_history(self, name: str, run_id: str | None = None) -> list[str]:
        """Every alias move of ``name``, oldest first (``TIME  NOTE`` lines)."""
        run_id = run_id or self._history_run(name)
        if run_id is None:
            return []
        if not any(a.path == ALIAS_HISTORY_FILE for a in self.client.list_artifacts(run_id)):
            return []
        # One small file: MLflow's progress bar would only add lines to register's output.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with tempfile.TemporaryDirectory(prefix="raytrain-at-history-") as tmp:
            path = self.client.download_artifacts(run_id, ALIAS_HISTORY_FILE, tmp)
            return [line for line in Path(path).read_text().splitlines() if line]

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
        return self._logged_facts(version)[0]

    def version_params(self, version) -> dict[str, str]:
        return self._logged_facts(version)[1]

    def _logged_facts(self, version) -> tuple[dict[str, float], dict[str, str]]:
        """Metrics and params of a version's logged model (one read). A re-evaluated version
        has several values per metric: the latest (highest step, then time) counts."""
        model_id = self.logged_model_id(version)
        if model_id is None:
            return {}, {}
        logged = self.client.get_logged_model(model_id)
        latest = sorted(logged.metrics or [], key=lambda m: (m.step or 0, m.timestamp or 0))
        return {m.key: m.value for m in latest}, dict(logged.params or {})

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
            metrics, params = self._logged_facts(version)
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


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def leaderboard_rows(rows: list[dict[str, Any]], norm: str = "linf",
                     size: str | None = None) -> list[dict[str, Any]]:
    """Rows filtered by size class (params in M) and sorted by the norm's robust accuracy."""
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r} (known: {', '.join(NORMS)})")
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
    key = f"robust_acc_{norm}"
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
