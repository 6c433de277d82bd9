"""``raytrain-at preflight``: the driver's checks, then the workers' on Ray Train, one table,
one MLflow run (see docs/preflight.md)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyarrow.fs import FileType
from ray.train import RunConfig as RayRunConfig
from ray.train import TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console
from rich.table import Table

from raytrain_at.config import RunConfig
from raytrain_at.data.ffcv_loaders import inspect_beton
from raytrain_at.errors import UserError
from raytrain_at.preflight.checks import Check, blocked, passed, raise_first_blocker
from raytrain_at.preflight.driver import check_data, check_mlflow, check_storage, check_weights
from raytrain_at.preflight.estimate import (Estimate, check_instance, estimate_run,
                                            instances_needed)
from raytrain_at.preflight.verdicts import (all_reduce_check, device_check, loader_check,
                                            step_check)
from raytrain_at.preflight.worker import ROWS_FILE, preflight_worker
from raytrain_at.runtime.ray_init import init_ray
from raytrain_at.runtime.storage import (default_home, explicit_root, filesystem,
                                         require_shared_root)
from raytrain_at.tracking.experiments import prepare_experiment
from raytrain_at.tracking.runs import default_tracking_uri
from raytrain_at.training.launch import failure_line, prepare_run, scaling_config

log = logging.getLogger(__name__)

EXPERIMENT = "preflight"
# GPUs per instance of the cluster's GPU node types (cluster.yaml), for the instance count.
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8, "p5.48xlarge": 8}


@dataclass(frozen=True)
class PreflightSettings:
    """What the command asks for beyond the recipe."""

    address: str | None = None
    storage_path: str | None = None
    instance: str | None = None  # None: p4d.24xlarge for a GPU run, this machine otherwise
    steps: int = 3
    warmup: int = 1
    loader_batches: int = 8
    # The loader must deliver at least this many times the step's images/s (1: as fast).
    loader_margin: float = 1.0


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    estimate: Estimate | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"checks": [c.as_dict() for c in self.checks], "workers": self.rows,
                "estimate": None if self.estimate is None else asdict(self.estimate),
                "seconds": round(self.seconds, 1)}


def run_preflight(config: RunConfig, settings: PreflightSettings, console: Console
                  ) -> PreflightReport:
    """Check ``config``'s run: driver first (storage, MLflow, weights, data), then its Ray
    Train workers (device, all-reduce, loader, step), then the estimate. Prints the table and
    logs it to MLflow.

    Raises:
        UserError: the first blocker, as the line that says what to change.
    """
    if settings.instance is not None:
        check_instance(settings.instance)  # a typo is a usage error, before any check runs
    start = time.perf_counter()
    report = PreflightReport()
    root = explicit_root(settings.storage_path, config.tracking.storage_path) or str(
        default_home())
    uri = config.tracking.tracking_uri or default_tracking_uri()
    report.checks += [check_storage(root), check_mlflow(uri), check_weights(config)]
    if all(c.passed for c in report.checks):
        prepared = _prepare(config, settings, report)
        if prepared is not None:
            report.checks.append(check_data(prepared.train_path, prepared.heldout_path))
            _worker_checks(prepared, settings, report)
    report.seconds = time.perf_counter() - start
    console.print(report_table(report, config))
    _log_to_mlflow(report, config, settings, uri)
    raise_first_blocker(report.checks)
    return report


def _prepare(config: RunConfig, settings: PreflightSettings, report: PreflightReport):
    """The launch's own validation (data checksums and provenance, held-out not from a test
    split); its error becomes the data check's blocker."""
    try:
        return prepare_run(config, run_name=f"preflight-{uuid.uuid4().hex[:8]}",
                           storage_path=settings.storage_path)
    except UserError as exc:
        report.checks.append(blocked("data", str(exc)))
        return None


def _worker_checks(prepared, settings: PreflightSettings, report: PreflightReport) -> None:
    """One Ray Train run of ``preflight_worker`` on the job's own worker placement; its run
    folder is removed afterwards, whatever the outcome (the rows are read before)."""
    config = prepared.config
    if config.scaling.use_gpu and not torch.cuda.is_available() and settings.address is None:
        # The embedded Ray of a machine without a GPU would wait for one for ever.
        report.checks.append(blocked("device", "scaling.use_gpu is true but this machine has no "
                                     "GPU: use --address for a cluster, or --set "
                                     "scaling.use_gpu=false"))
        return
    init_ray(settings.address)
    try:
        # As train's own check: rank 0's rows, written on a worker node's local disk, would
        # not reach the driver ("the workers reported no figures").
        require_shared_root("set" if prepared.shared_storage else None, "the preflight")
    except UserError as exc:
        report.checks.append(blocked("storage", str(exc)))
        return
    try:
        rows = _run_workers(prepared, settings)
    except TrainingFailedError as exc:
        report.checks.append(blocked("workers", f"{worker_failure_line(exc)} (the workers' "
                                     "output is in Ray's session logs)"))
        return
    finally:
        remove_run_folder(prepared.storage_path, prepared.run_name)
    if rows is None:
        report.checks.append(blocked("workers", "the workers reported no figures"))
        return
    report.rows = rows
    report.checks.append(device_check(report.rows, config))
    if any("error" in r for r in report.rows):
        return
    report.checks += [all_reduce_check(report.rows), step_check(report.rows),
                      loader_check(report.rows, config, margin=settings.loader_margin)]
    step_s = max(r["step_s_median"] for r in report.rows)
    samples = min(inspect_beton(prepared.train_path).num_samples,
                  config.data.train_size or 10**12)
    instance = settings.instance or ("p4d.24xlarge" if config.scaling.use_gpu else "local")
    instances = instances_needed(config.scaling.num_workers, GPUS_PER_INSTANCE.get(instance, 0)
                                 ) if config.scaling.use_gpu else 1
    report.estimate = estimate_run(samples=samples, global_batch=config.schedule.global_batch_size,
                                   epochs=config.schedule.epochs, step_s=step_s,
                                   instance=instance, instances=instances)
    report.checks.append(passed("estimate", "ok", report.estimate.figure()))


def _run_workers(prepared, settings: PreflightSettings) -> list[dict[str, Any]] | None:
    """The workers' rows, read from rank 0's report (None: it reported none); Ray is up."""
    config = prepared.config
    payload = {**prepared.worker_payload(), "steps": settings.steps, "warmup": settings.warmup,
               "loader_batches": settings.loader_batches}
    trainer = TorchTrainer(
        preflight_worker, train_loop_config=payload, scaling_config=scaling_config(config),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RayRunConfig(name=prepared.run_name, storage_path=prepared.storage_path))
    result = trainer.fit()
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / ROWS_FILE).read_text())


def worker_failure_line(error: BaseException) -> str:
    """One line for a worker that raised: the lowest failed rank's own error (Ray's whole
    message runs to many lines), else the first lines of Ray's."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        text = str(cause).strip().splitlines()
        return f"worker {rank} failed: {type(cause).__name__}" + (f": {text[0][:200]}"
                                                                   if text else "")
    return failure_line(error)


def remove_run_folder(storage_path: str, run_name: str) -> None:
    """Delete the preflight's Ray run folder ``storage_path/run_name`` (local or s3://): it
    holds only the rows' checkpoint, which the report has read. Best effort: a folder that
    cannot be deleted is logged, not raised (the preflight's verdict stands)."""
    fs, base = filesystem(storage_path)
    folder = f"{base.rstrip('/')}/{run_name}"
    try:
        if fs.get_file_info(folder).type != FileType.NotFound:
            fs.delete_dir(folder)
    except OSError as exc:
        log.warning("could not remove the preflight's run folder %s: %s", folder, exc)


def report_table(report: PreflightReport, config: RunConfig) -> Table:
    """The one-screen table: check, result, figure (a blocker's figure is what to change)."""
    table = Table(title=f"preflight {config.recipe or 'run'}: {config.model.name}, "
                  f"{config.scaling.num_workers} worker(s), {report.seconds:.0f} s")
    for column in ("check", "result", "figure"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        style = "red" if check.blocker else "green"
        table.add_row(check.name, f"[{style}]{check.result}[/{style}]",
                      check.blocker or check.figure)
    return table


def _log_to_mlflow(report: PreflightReport, config: RunConfig, settings: PreflightSettings,
                   uri: str) -> None:
    """One run in the ``preflight`` experiment: params, the estimate's figures as metrics, the
    whole report as preflight.json. Skipped when MLflow itself is the blocker."""
    if any(c.name == "mlflow" and c.blocker for c in report.checks):
        return
    import mlflow

    prepare_experiment(uri, EXPERIMENT)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return
    run = client.create_run(experiment.experiment_id, run_name=f"preflight-{config.recipe}")
    params = {"recipe": config.recipe or "", "model": config.model.name,
              "num_workers": config.scaling.num_workers, "use_gpu": config.scaling.use_gpu,
              "micro_batch": config.per_worker_batch_size,
              "loader_workers": config.data.loader_workers,
              "cpus_per_worker": config.scaling.cpus_per_worker,
              "address": settings.address or "embedded", "instance": settings.instance or ""}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    if report.rows and "step_images_per_s" in report.rows[0]:
        client.log_metric(run.info.run_id, "step_images_per_s",
                          min(r["step_images_per_s"] for r in report.rows))
        client.log_metric(run.info.run_id, "loader_images_per_s",
                          min(r["loader_images_per_s"] for r in report.rows))
    if report.estimate is not None:
        client.log_metric(run.info.run_id, "estimate_wall_s", report.estimate.wall_s)
        client.log_metric(run.info.run_id, "estimate_on_demand_usd",
                          report.estimate.on_demand_usd)
        client.log_metric(run.info.run_id, "estimate_spot_usd", report.estimate.spot_usd)
    with tempfile.TemporaryDirectory(prefix="preflight-") as folder:
        path = Path(folder) / "preflight.json"
        path.write_text(json.dumps(report.as_dict(), indent=2))
        client.log_artifact(run.info.run_id, str(path))
    blockers = [c for c in report.checks if c.blocker]
    client.set_terminated(run.info.run_id, "FAILED" if blockers else "FINISHED")
