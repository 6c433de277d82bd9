"""A Ray Tune study over a search space: every trial a short Ray Train run, the best registered.

The pattern is Ray 2.60's: the Tune trainable is a function that builds a ``TorchTrainer`` for its
sampled config and hands Ray Train's per-epoch reports to Tune through ``TuneReportCallback``, so
a scheduler such as ASHA (time unit: the reported ``epoch``) can stop lagging trials. The trial
function itself asks for almost no CPU (its Train workers hold the resources), and the number of
concurrent trials follows the cluster's CPUs or GPUs divided by what one trial's workers need.

MLflow: the study is one parent run (the space, the results table and the plot); every trial's
rank 0 writes its own run, tagged as the parent's child (``mlflow.parentRunId``). Ray ends a
stopped trial's workers without letting them close their run, so the driver marks those runs
KILLED afterwards and tags them ``raytrain_at.tune.stopped_early``.

After the search the best completed trials (by the space's metric) are evaluated with AutoAttack
as the space's ``evaluation`` section says (the l_2 / l_1 columns show how the l_inf-trained
designs generalise), and the best evaluated one is registered.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from raytrain_at.config import RunConfig
from raytrain_at.config_loader import deep_merge, flat_keys, nest, validate
from raytrain_at.errors import UserError
from raytrain_at.names import check_name
from raytrain_at.runtime.worker_output import worker_log_file
from raytrain_at.runtime.ray_init import init_ray
from raytrain_at.runtime.storage import (default_home, explicit_root, require_shared_root,
                                         storage_root)
from raytrain_at.tuning.paper import write_paper_comparison
from raytrain_at.tuning.report import TrialRecord, TrialStatus, write_report
from raytrain_at.tuning.spaces import SchedulerSpec, SearchSpace, evaluation_data

log = logging.getLogger(__name__)

TRIAL_TAG = "raytrain_at.tune.trial_id"
STUDY_TAG = "raytrain_at.tune.study"
STOPPED_TAG = "raytrain_at.tune.stopped_early"
PARENT_TAG = "mlflow.parentRunId"
EVALUATION_TAG = "raytrain_at.tune.evaluation"



@dataclass(frozen=True)
class StudyOptions:
    """What the command line may change about a space, and where things go.

    Attributes:
        name: the study's name (Tune experiment, MLflow parent run); default: space + time.
        recipe: replaces the space's base recipe (the space is validated again against it).
        scheduler: replaces the space's scheduler kind (``asha`` keeps the space's settings).
        fast: the space's ``--fast`` mode (the whole grid with ASHA; see
            :meth:`~raytrain_at.tuning.spaces.SearchSpace.in_fast_mode`) instead of paper mode.
        num_samples: replaces the space's ``num_samples``.
        address: Ray address to join (``auto`` on a cluster node); None starts Ray locally.
        max_concurrent: trials at a time; None derives it from the cluster's resources.
        storage_path: Ray Train / Tune storage (a folder or ``s3://...``); None: the home.
        register_name: registered model name of the best trial; default ``tune-<space>``.
        tags: extra tags of the study's parent MLflow run (e.g. a benchmark configuration).
        quiet: no results table on the terminal (a caller prints its own summary).
    """

    name: str | None = None
    recipe: str | None = None
    scheduler: Literal["asha", "fifo"] | None = None
    fast: bool = False
    num_samples: int | None = None
    address: str | None = None
    max_concurrent: int | None = None
    storage_path: str | None = None
    register_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    quiet: bool = False


@dataclass
class StudyOutcome:
    """What a finished study produced."""

    name: str
    space: SearchSpace
    parent_run_id: str
    records: list[TrialRecord]
    best: TrialRecord | None
    results_csv: Path
    plot: Path
    registered: str | None = None  # "NAME version N"


@dataclass(frozen=True)
class _TrialContext:
    """Everything a trial needs, computed on the driver (trial processes start elsewhere, with
    another working directory, so no relative path or default is resolved there)."""

    study: str
    space: SearchSpace
    base: dict[str, Any]  # the validated config of base recipe + fixed keys, nested
    storage_path: str
    parent_run_id: str


# --------------------------------------------------------------------------- the trial
def trial_config(context: _TrialContext, sample: dict[str, Any]) -> RunConfig:
    """The run config of one trial: the study's base config with the trial's sample (nested as
    Tune passes it, or dotted as a :class:`TrialRecord` keeps it) merged in."""
    data = deep_merge(context.base, nest(context.space.flat_sample(sample)))
    return validate(RunConfig, data)


def _run_trial(sample: dict[str, Any], context: _TrialContext) -> None:
    """The Tune trainable: one short Ray Train run whose epoch reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytrain_at.training.launch import build_trainer, prepare_run

    trial_id = tune.get_context().get_trial_id()
    prepared = prepare_run(
        trial_config(context, sample), run_name=f"{context.study}-{trial_id}",
        storage_path=context.storage_path,
        run_tags={PARENT_TAG: context.parent_run_id, STUDY_TAG: context.study,
                  TRIAL_TAG: trial_id})
    build_trainer(prepared, callbacks=[TuneReportCallback()]).fit()


# --------------------------------------------------------------------------- the driver
def apply_options(space: SearchSpace, options: StudyOptions) -> SearchSpace:
    """The space with the command line's mode, recipe, scheduler and sample count (validated
    again)."""
    if options.fast:
        space = space.in_fast_mode()
    update: dict[str, Any] = {}
    if options.recipe is not None:
        update["recipe"] = options.recipe
    if options.scheduler is not None and options.scheduler != space.scheduler.kind:
        update["scheduler"] = SchedulerSpec(kind=options.scheduler)
    if options.num_samples is not None:
        if options.num_samples < 1:
            raise UserError(f"--num-samples {options.num_samples} must be at least 1")
        update["num_samples"] = options.num_samples
    if not update:
        return space
    changed = space.model_copy(update=update)
    changed._source, changed._fast = space.source, space.study_mode == "fast"
    return changed.validate_against_config()


# What the trial function itself holds while its Train workers run (Tune needs a bundle).
TRIAL_DRIVER_CPU = 0.01


def trial_concurrency(config: RunConfig, resources: Mapping[str, float], *,
                      local: bool) -> int:
    """How many trials fit at once: the cluster's GPUs (or CPUs) over one trial's need.

    Args:
        config: a trial's run config (its ``scaling`` section).
        resources: ``ray.cluster_resources()``.
        local: Ray runs on this machine only (no autoscaler can add nodes).

    Raises:
        UserError: on a local Ray, one trial's CPU workers plus the trial function do not fit
            (Ray would wait for them forever).
    """
    scaling = config.scaling
    if scaling.use_gpu:
        need, have = float(scaling.num_workers), resources.get("GPU", 0.0)
        return max(1, int(math.floor(have / need + 1e-9)))
    need, have = scaling.num_workers * scaling.cpus_per_worker, resources.get("CPU", 0.0)
    if local and need + TRIAL_DRIVER_CPU > have + 1e-9:
        raise UserError(
            f"a trial needs {need:g} CPUs for its {scaling.num_workers} workers plus "
            f"{TRIAL_DRIVER_CPU} for the trial itself, but Ray has {have:g} here: lower "
            f"scaling.cpus_per_worker (e.g. {0.95 * have / scaling.num_workers:.2f}) or "
            "scaling.num_workers")
    return max(1, int(math.floor((have - TRIAL_DRIVER_CPU) / need + 1e-9)))


def _scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = space.scheduler
    if spec.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=space.scheduler_max_t(),
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


def _storage(options: StudyOptions, base: RunConfig) -> tuple[str, Path]:
    """(Ray storage for Train runs and Tune, local folder for this study's reports)."""
    chosen = storage_root(options.storage_path, base.tracking.storage_path)
    if "://" in chosen:
        return chosen.rstrip("/"), default_home()
    local = Path(chosen).expanduser().resolve()
    return str(local), local


def run_study(space: SearchSpace, options: StudyOptions = StudyOptions()) -> StudyOutcome:
    """Run a whole study: validate, search, tabulate, plot, evaluate and register the best.

    Args:
        space: a space from :func:`~raytrain_at.tuning.spaces.load_space`.
        options: command-line changes and locations (see :class:`StudyOptions`).

    Raises:
        UserError: a bad option or space (before any trial), or every trial failed.
    """
    from ray import tune

    from raytrain_at.tracking.runs import TrainingRun, default_tracking_uri
    from raytrain_at.training.launch import prepare_run

    space = apply_options(space, options)
    name = options.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(name, "study name")
    if space.evaluation.register_best:
        # Checked here too: register_model would refuse a bad name only after every trial ran.
        check_name(options.register_name or f"tune-{space.name}", "model name")
    tracking_uri = default_tracking_uri()
    from raytrain_at.config import load_config

    base = load_config(space.recipe,
                       values={**space.fixed, "tracking.tracking_uri": tracking_uri})
    storage, local = _storage(options, base)
    # On the driver, before Ray: datasets and weights of the first trial (a bad path fails here,
    # and the bundled data is written once instead of by concurrent trials).
    prepare_run(trial_config(_TrialContext(name, space, base.model_dump(mode="json"), storage,
                                           ""), _first_sample(space)), storage_path=storage)
    init_ray(options.address, dashboard=True)
    require_shared_root(explicit_root(options.storage_path, base.tracking.storage_path),
                        "the Tune study")
    report_dir = local / "tune" / name
    report_dir.mkdir(parents=True, exist_ok=True)
    import ray

    concurrency = options.max_concurrent or trial_concurrency(
        base, ray.cluster_resources(), local=options.address is None)
    parent = TrainingRun(tracking_uri, base.tracking.experiment, name)
    parent.set_tags({STUDY_TAG: name, "raytrain_at.tune.space": space.name, **options.tags})
    parent.log_params({"space": space.name, "description": space.description,
                       "recipe": space.recipe, "metric": space.metric, "mode": space.mode,
                       "study_mode": space.study_mode,
                       **({"paper_table": space.paper.table} if space.paper else {}),
                       "scheduler": space.scheduler.kind, "num_trials": space.num_trials(),
                       "max_concurrent_trials": concurrency,
                       **{f"fixed.{k}": v for k, v in space.fixed.items()},
                       **{f"search.{k}": d.model_dump(exclude_none=True)
                          for k, d in space.search.items()}})
    context = _TrialContext(name, space, base.model_dump(mode="json"), storage,
                            parent.run_id)
    log.info("study %s (%s mode): %d trials of %s, %d at a time, scheduler %s", name,
             space.study_mode, space.num_trials(), space.recipe, concurrency,
             space.scheduler.kind)
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_run_trial, context=context),
                                {"CPU": TRIAL_DRIVER_CPU}),
            param_space=space.to_tune_param_space(),
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode,
                                        scheduler=_scheduler(space),
                                        num_samples=space.num_samples,
                                        max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=f"{storage}/tune", verbose=1))
        # The trials' worker output (every rank of every trial) goes to the study's folder;
        # the console keeps Tune's status table and rank 0's progress lines.
        with worker_log_file(report_dir / "console.log"):
            grid = tuner.fit()
        records = _records(grid, space, base.schedule.epochs)
        _close_trial_runs(parent.client, parent.experiment_id, parent.run_id, records)
        if not any(r.status != "errored" for r in records):
            raise UserError(f"study {name}: every trial failed; first error: "
                            f"{records[0].error if records else 'no trial started'}")
        best = evaluate_best(context, records, report_dir, tracking_uri,
                             address=options.address)
        registered = None
        if best is not None and space.evaluation.register_best:
            registered = register_best(best, options.register_name or f"tune-{space.name}",
                                       tracking_uri)
        results_csv, plot = write_report(records, space, report_dir, quiet=options.quiet)
        for path in (results_csv, plot):
            parent.log_file(path)
        if space.paper is not None:
            comparison = write_paper_comparison(records, space, report_dir,
                                                quiet=options.quiet)
            for path in (comparison.csv, comparison.plot):
                parent.log_file(path)
            # MLflow's own table artifact: browsable (and comparable across runs) in the UI.
            parent.log_table(comparison.columns, "paper_comparison.json")
        for record in records:
            if record.evaluation_path:
                parent.log_file(record.evaluation_path, "evaluations")
        if best is not None:
            parent.set_tags({"raytrain_at.tune.best_trial": best.trial_id,
                             "raytrain_at.tune.best_run": best.run_id or "",
                             "raytrain_at.tune.registered": registered or ""})
            parent.log_metrics({f"best_{space.metric}": best.metrics.get(space.metric, math.nan),
                                **{f"best_{k}": v for k, v in best.evaluation.items()}}, step=0)
        parent.finish()
        return StudyOutcome(name=name, space=space, parent_run_id=parent.run_id, records=records,
                            best=best, results_csv=results_csv, plot=plot, registered=registered)
    except BaseException:
        parent.finish("FAILED")
        raise


def _first_sample(space: SearchSpace) -> dict[str, Any]:
    return {key: dist.first for key, dist in space.search.items()}


def _searched(space: SearchSpace, config: dict[str, Any]) -> dict[str, Any]:
    """The searched keys of a trial's (nested) Tune config as ``{dotted key: value}`` (a paper
    row's label as its row's point)."""
    try:
        return space.flat_sample(config)
    except UserError:  # an errored trial may lack keys: show what it has
        flat = flat_keys(config)
        return {key: flat.get(key) for key in space.search}


def _records(grid, space: SearchSpace, epochs: int) -> list[TrialRecord]:
    """One record per trial from Tune's result grid, in the order Tune started them."""
    records = []
    for result in grid:
        metrics = dict(result.metrics or {})
        sample = _searched(space, result.config or {})
        reached = int(metrics.get("epoch", 0))
        if result.error is not None:
            status: TrialStatus = "errored"
        elif reached >= epochs:
            status = "completed"
        else:
            status = "stopped early"
        records.append(TrialRecord(
            trial_id=str(metrics.get("trial_id") or Path(result.path).name), sample=sample,
            metrics={k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
            epochs=reached, status=status,
            error=None if result.error is None else str(result.error).strip().splitlines()[0]))
    return records


def _close_trial_runs(client, experiment_id: str, parent_run_id: str,
                      records: list[TrialRecord]) -> None:
    """Link every record to its MLflow run; end the runs of trials Ray stopped mid-way."""
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10000)
    by_trial = {run.data.tags.get(TRIAL_TAG): run for run in runs}
    for record in records:
        run = by_trial.get(record.trial_id)
        if run is None:
            continue
        record.run_id = run.info.run_id
        if record.status == "stopped early":
            client.set_tag(record.run_id, STOPPED_TAG, f"after epoch {record.epochs}")
        if run.info.status == "RUNNING":
            client.set_terminated(record.run_id,
                                  status="FAILED" if record.status == "errored" else "KILLED")


# --------------------------------------------------------------------------- after the search
def ranked(records: list[TrialRecord], space: SearchSpace) -> list[TrialRecord]:
    """Completed trials, best first by the score of their selected checkpoint (the best
    held-out epoch: what is evaluated and registered), else the metric's last value."""
    def score(record: TrialRecord) -> float:
        return record.metrics.get(f"selected_{space.metric}", record.metrics[space.metric])

    done = [r for r in records if r.status == "completed" and space.metric in r.metrics]
    return sorted(done, key=score, reverse=space.mode == "max")


def evaluate_best(context: _TrialContext, records: list[TrialRecord], report_dir: Path,
                  tracking_uri: str, *, address: str | None = None) -> TrialRecord | None:
    """AutoAttack on the test data of the best completed trials' selected (best held-out
    epoch's EMA) weights, ``runs:/ID/model``: ``evaluation.top`` of them, or every one
    (``top: all``, the paper mode). Each trial's clean and robust accuracies also go to its own
    MLflow run (``autoattack_clean_acc``, ``autoattack_robust_acc_linf``, ...).

    On a cluster (``address``) the evaluation (its corruptions too) runs on the trials' device,
    ``scaling.use_gpu``; on this machine, a GPU where it has one.

    Returns:
        The best of them by the space's metric (None when nothing was evaluated).
    """
    from raytrain_at.evaluation.evaluate import EvaluationRequest, evaluate
    from raytrain_at.tracking.runs import log_run_metrics
    from raytrain_at.training.launch import expand_path

    space = context.space
    spec = space.evaluation
    candidates = [r for r in ranked(records, space) if r.run_id is not None]
    chosen = candidates[:spec.count(len(candidates))]
    for record in chosen:
        config = trial_config(context, record.sample)
        data = expand_path(evaluation_data(spec, config) or "", "evaluation.data")
        settings = spec.settings()
        if "batch_size" not in spec.model_fields_set:
            # One chunk per worker: the workers share the images, not only the norms.
            settings["batch_size"] = max(1, -(-(spec.n or 250) // spec.workers))
        request = EvaluationRequest(
            **settings, model_ref=f"runs:/{record.run_id}/model", data=data,
            out=report_dir / f"evaluation-{record.trial_id}.json", tracking_uri=tracking_uri,
            # The study's storage root: on a cluster, every shard's node writes its chunk
            # records there. The address sends even a one-worker evaluation (and the
            # corruptions) to the cluster rather than to the driver's node (a head without
            # GPUs); the trials' device is known before the first trial, so the study never ends
            # on "--gpu or --no-gpu".
            state_root=f"{context.storage_path}/eval-state", address=address,
            use_gpu=config.scaling.use_gpu or (False if address is not None else None))
        log.info("evaluating trial %s (%s) with AutoAttack %s", record.trial_id, record.run_id,
                 spec.version)
        result, path = evaluate(request)
        record.evaluation = result.metrics()
        record.evaluation_path = str(path)
        record.evaluation_n = result.data.n
        log_run_metrics(tracking_uri, cast(str, record.run_id),
                        {f"autoattack_{k}": v for k, v in record.evaluation.items()},
                        tags={EVALUATION_TAG: spec.version})
    return chosen[0] if chosen else None


def register_best(best: TrialRecord, name: str, tracking_uri: str) -> str:
    """Register the best trial's model with its evaluation; returns ``"NAME version N"``.

    An evaluation that failed a guard is still registered, tagged untrustworthy (``forced``) and
    without champion aliases, so the study's outcome is kept and visibly marked.
    """
    from raytrain_at.evaluation.result import read_result
    from raytrain_at.registry.register import register_model

    # evaluate_best sets the path of the record it returns.
    trustworthy = read_result(cast(str, best.evaluation_path)).trustworthy
    done = register_model(f"runs:/{best.run_id}/model", name, eval_path=best.evaluation_path,
                          force=not trustworthy, tracking_uri=tracking_uri)
    for note in done.alias_notes:
        log.info("%s", note)
    return f"{done.name} version {done.version}"
