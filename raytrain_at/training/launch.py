"""Launch a run on Ray Train: validate everything on the driver, then start the workers.

The driver resolves dataset paths (``$RAYTRAIN_AT_DATA`` style variables, the bundled ``digits``
written once to FFCV files), validates them and the initial weights, fixes the MLflow tracking URI
to an absolute one, and starts a ``TorchTrainer`` (Ray Train V2) with failure handling and
checkpoint retention. A bad key, dataset or checkpoint therefore stops the run before any worker
starts. Re-running with the same run name and storage resumes from the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from raytrain_at.config import RunConfig, flatten
from raytrain_at.data.provenance import is_test_data, require_provenance, verify_beton
from raytrain_at.runtime.console import is_verbose, user_line
from raytrain_at.errors import RetriesStopped, RunFailed, UserError, first_lines
from raytrain_at.names import check_name
from raytrain_at.runtime.worker_output import worker_log_file
from raytrain_at.runtime.ray_init import init_ray
from raytrain_at.runtime.storage import check_root, default_home, explicit_root, require_shared_root
from raytrain_at.tracking.redact import redacted_config_dump, without_userinfo
from raytrain_at.training.checkpoint_manifest import restore_first_good
from raytrain_at.training.device_setup import prepare_worker_device
from raytrain_at.training.progress import epoch_line, progress_line
from raytrain_at.training.resume_check import (changed_tags, check_resume_config,
                                               latest_saved_config)
from raytrain_at.training.selection import SCORE_KEY
from raytrain_at.training.single_rank import rank_environment, single_rank_environment

if TYPE_CHECKING:  # timm-heavy; the driver's dry runs import this module without it
    from raytrain_at.models.weights import LoadReport

log = logging.getLogger(__name__)

# The MLflow tag holding a failed run's error (one line).
ERROR_TAG = "raytrain_at.error"

_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand_path(value: str, key: str) -> str:
    """Expand ``$VAR`` in a config path, naming the key when a variable is not set."""
    for name in _VAR.findall(value):
        if name not in os.environ:
            raise UserError(f"{key} refers to ${name}, which is not set in the environment")
    return os.path.expandvars(value)


@dataclass(frozen=True)
class PreparedRun:
    """What the workers receive: the config and resolved, validated paths."""

    config: RunConfig
    train_path: str
    heldout_path: str | None
    tracking_uri: str
    run_name: str
    storage_path: str
    # Extra MLflow tags of the run (a Tune trial: its parent study run and trial id).
    run_tags: dict[str, str] = field(default_factory=dict)
    # Whether the storage root was set (option, config, $RAYTRAIN_AT_STORAGE) rather than the
    # node-local home, which a run over several nodes refuses (raytrain_at.runtime.storage).
    shared_storage: bool = False

    def worker_payload(self) -> dict[str, Any]:
        return {"run": self.config.model_dump(mode="json"), "train_path": self.train_path,
                "heldout_path": self.heldout_path, "tracking_uri": self.tracking_uri,
                "run_name": self.run_name, "run_tags": dict(self.run_tags),
                "run_folder": str(run_folder(self))}


def _validate_dataset(path: str, key: str, config: RunConfig) -> None:
    """The file matches its recorded checksum, is FFCV, its labels fit the model, (train) it
    fills a global batch, and (held-out) its provenance says it is not test data."""
    from raytrain_at.data.ffcv_loaders import inspect_beton
    from raytrain_at.data.inspection import beton_labels

    if Path(path).is_file():  # (a missing file is named by inspect_beton below)
        if key == "data.heldout":
            require_provenance(path, key)  # without it the test-split check cannot see
        verify_beton(path, key)
    if key == "data.heldout" and is_test_data(path):
        raise UserError(f"data.heldout {path!r} was written from a test split: checkpoints are "
                        "selected on held-out training data (write one with --split val, or "
                        "--subset heldout4k for ImageNet)")
    info = inspect_beton(path)
    top = int(beton_labels(path).max())
    if top >= config.model.num_classes:
        raise UserError(f"{key} {path!r} has label {top}, but model.num_classes is "
                        f"{config.model.num_classes}")
    usable = min(info.num_samples, config.data.train_size or info.num_samples)
    if key == "data.train" and usable // config.scaling.num_workers < config.per_worker_batch_size:
        raise UserError(f"data.train {path!r} gives {usable} samples: too few for a global "
                        f"batch of {config.schedule.global_batch_size}")


def prepare_data(config: RunConfig, storage: Path) -> tuple[str, str | None]:
    """Resolve and validate the train and held-out files: the user's files first, so their
    errors come before the bundled data is written (once, cached)."""
    from raytrain_at.data.write import bundled_beton

    heldout = config.data.heldout
    if config.data.train == "digits" and heldout is None:
        heldout = "digits"
    # The bundled digits: train on 1,350, select on the 150 validation digits carved from the
    # training split; the 297 test digits are for evaluation only.
    splits = {"data.train": (config.data.train, "train"), "data.heldout": (heldout, "val")}
    paths: dict[str, str | None] = {}
    for key, (value, _) in splits.items():
        if value not in (None, "digits"):
            paths[key] = expand_path(value, key)
            _validate_dataset(cast(str, paths[key]), key, config)
    for key, (value, split) in splits.items():
        if value == "digits":
            paths[key] = bundled_beton("digits", split, storage)
            _validate_dataset(cast(str, paths[key]), key, config)
    # data.train is a str: one of the two loops above set it.
    return cast(str, paths["data.train"]), paths.get("data.heldout")


def _check_weights(config: RunConfig) -> None:
    """Build the model once on the driver, so a bad stem or checkpoint fails here."""
    from raytrain_at.training.loop import build_model

    m = config.model
    for key in ("pretrained", "init"):
        value = getattr(m, key)
        if value is not None and not value.startswith(("hub:", "models:/", "runs:/", "run:")):
            setattr(m, key, expand_path(value, f"model.{key}"))
    build_model(config)


def default_run_name(config: RunConfig) -> str:
    digest = hashlib.sha1(repr(sorted(flatten(config).items())).encode()).hexdigest()[:8]
    return f"{config.recipe or 'run'}-{digest}"


def prepare_run(config: RunConfig, *, run_name: str | None = None,
                storage_path: str | None = None,
                run_tags: dict[str, str] | None = None,
                allow_change: frozenset[str] = frozenset()) -> PreparedRun:
    """Validate a run on the driver (datasets, weights, tracking) before any worker starts.

    A run name that has checkpoints resumes: its config must equal the latest checkpoint's
    except for the keys in ``allow_change`` (:mod:`.resume_check`), whose accepted changes
    become MLflow tags of the run.
    """
    from raytrain_at.tracking.experiments import absolute_tracking_uri, check_tracking_server
    from raytrain_at.tracking.runs import default_tracking_uri

    config = config.model_copy(deep=True)
    # First: the name is the run's folder (and its MLflow run), so nothing is written before.
    name = check_name(run_name or config.tracking.run_name or default_run_name(config),
                      "run name")
    explicit = explicit_root(storage_path, config.tracking.storage_path)
    chosen = explicit or str(default_home())
    check_root(chosen)
    uri = absolute_tracking_uri(config.tracking.tracking_uri or default_tracking_uri())
    check_tracking_server(uri)
    _check_weights(config)
    if "://" in chosen:
        # Cloud storage (s3://, gs://) for Ray Train's checkpoints: kept as a URI, and the
        # bundled datasets go to the local home instead.
        runs = chosen.rstrip("/") + "/runs"
        local = default_home()
    else:
        local = Path(chosen).resolve()
        runs = str(local / "runs")
    # Before anything is written: a resume with a changed config stops here.
    tags = dict(run_tags or {})
    tags.update(_accepted_changes(config, runs, name, allow_change))
    local.mkdir(parents=True, exist_ok=True)
    train, heldout = prepare_data(config, local)
    return PreparedRun(config=config, train_path=train, heldout_path=heldout, tracking_uri=uri,
                       run_name=name, storage_path=runs, run_tags=tags,
                       shared_storage=explicit is not None)


def _accepted_changes(config: RunConfig, runs: str, name: str,
                      allow_change: frozenset[str]) -> dict[str, str]:
    """The MLflow tags of the config changes a resume may make; raises on any other."""
    if "://" not in runs and not Path(runs, name).is_dir():
        saved = None  # a fresh local run: nothing to compare (and pyarrow need not list)
    else:
        saved = latest_saved_config(runs, name)
    changes = check_resume_config(saved[0] if saved else None, config.model_dump(mode="json"),
                                  allow_change, saved[1] if saved else "")
    if changes:
        user_line(f"resuming {name} with changed " + ", ".join(
            f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()))
    return changed_tags(changes)


def run_params(config: RunConfig, init_report: LoadReport | None) -> dict[str, Any]:
    """The MLflow params of a training run: its flat config and, when it starts from weights,
    what that load matched (``init.matched`` of ``init.total`` tensors, the layout, the modules
    left fresh and the normalisation taken from them)."""
    params: dict[str, Any] = dict(flatten(config))
    if params.get("tracking.tracking_uri"):  # the URI may hold credentials
        params["tracking.tracking_uri"] = without_userinfo(str(params["tracking.tracking_uri"]))
    if init_report is not None:
        params.update(init_report.as_params())
    return params


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train worker entry: build the loop, resume if Ray hands a checkpoint, train, report."""
    import ray.train
    import ray.train.torch

    from raytrain_at.training.loop import WorkerLoop, WorkerPlace

    context = ray.train.get_context()
    place = WorkerPlace(rank=context.get_world_rank(), world_size=context.get_world_size(),
                        device=ray.train.torch.get_device())
    config = RunConfig.model_validate(payload["run"])
    # Before anything is built: a GPU run without CUDA is one line here, not an NCCL error.
    prepare_worker_device(config.scaling.use_gpu, place.device)
    # DeepSpeed reads these even when Ray has already initialised the process group.
    rank_environment(place.rank, place.world_size, context.get_local_rank(), 29500,
                     keep_existing=True)
    # model.init may name the clean run by reference (run:EXPERIMENT/NAME, runs:/ID/model,
    # models:/NAME@ALIAS): a worker on another node resolves it on the run's tracking server.
    os.environ.setdefault("MLFLOW_TRACKING_URI", payload["tracking_uri"])
    loop = WorkerLoop(config, place, payload["train_path"], payload["heldout_path"])
    checkpoint = ray.train.get_checkpoint()
    restored: list[dict[str, Any]] = []
    if checkpoint is not None:
        # The newest checkpoint that passes its checksums; rank 0 says which newer ones failed
        # (its line reaches the console and console.log; every rank takes the same decision).
        restore_first_good(checkpoint, lambda: earlier_checkpoints(checkpoint),
                           lambda folder: restored.extend(
                               _restore(loop, folder, place.rank, checkpoint)),
                           say=user_line if place.rank == 0 else log.debug)
    # Rank 0 alone speaks to the user and tracks (the one place of that gating).
    tracker = _start_tracking(payload, config, loop, restored) if place.rank == 0 else None
    scratch = Path(tempfile.mkdtemp(prefix="raytrain-at-ckpt-"))

    def report(metrics: dict[str, float], directory: Path | None) -> None:
        # The epoch's metrics are in the tracking journal (and its copy in the checkpoint)
        # already; MLflow gets them from the background sender, never before this report.
        if tracker is not None:
            user_line(epoch_line(metrics, config.schedule.epochs))
        report_to_ray(metrics, directory)

    try:
        loop.run(report, scratch)
        if tracker is not None:
            _finish_tracking(tracker, loop, config)
        # Ray waits for the uploads only after this function returns: before the scratch
        # folder goes, the last checkpoint must be uploaded (and Ray has deleted its copy).
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    except BaseException:
        if tracker is not None:
            _mark_failed(tracker)
        raise
    finally:
        # On a failure an upload may be cut short: the resume's checksums refuse what it left.
        shutil.rmtree(scratch, ignore_errors=True)


def report_to_ray(metrics: dict[str, float], directory: Path | None) -> None:
    """Report an epoch to Ray Train, uploading its checkpoint folder in the background.

    Ray's single upload thread copies the folder to the run's storage (about 1 GB for ViT-B
    on S3) while the next epoch trains, in report order, and deletes it afterwards; a failed
    upload fails this worker (Ray raises it in the training thread), so the run retries from
    its last checkpoint instead of going on without one.
    """
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
    ray.train.report(metrics, checkpoint=ckpt,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)


def _restore(loop, folder: Path, rank: int, latest) -> list[dict[str, Any]]:
    """Restore ``loop`` from a verified checkpoint folder (the selected weights from the
    older checkpoint of ``latest``'s run that holds them, where needed); rank 0 also gets the
    tracking records the checkpoint carries (those not delivered when it was written)."""
    from raytrain_at.tracking.buffered import JOURNAL_FILE, read_journal
    from raytrain_at.training.loop import STATE_FILE
    from raytrain_at.training.selected_weights import selected_from_earlier

    # Rank 0 says when the checkpoint's world size differs (its line reaches the console).
    loop.load(folder, lambda epoch, name: selected_from_earlier(
        earlier_checkpoints(latest), epoch, name, STATE_FILE),
              say=user_line if rank == 0 else log.debug)
    return read_journal(folder / JOURNAL_FILE) if rank == 0 else []


def _start_tracking(payload: dict[str, Any], config: RunConfig, loop,
                    restored: list[dict[str, Any]]):
    """Rank 0's MLflow run behind its journal: params, tags, step and epoch metrics are
    buffered (never a wait on the server), the journal is copied into every checkpoint."""
    from raytrain_at.tracking.buffered import (JOURNAL_FILE, BufferedRun,
                                               use_short_client_timeouts)

    use_short_client_timeouts()
    tracker = BufferedRun(payload["tracking_uri"], config.tracking.experiment,
                          payload["run_name"], Path(payload["run_folder"]) / JOURNAL_FILE,
                          restored=restored, say=user_line)
    tracker.log_params(run_params(config, loop.init_report))
    tracker.set_tags(payload.get("run_tags") or {})
    loop.on_progress = _progress_reporter(tracker, payload["run_name"])
    loop.on_epoch_metrics = lambda metrics: tracker.log_metrics(metrics,
                                                                step=int(metrics["epoch"]))
    loop.checkpoint_extras = tracker.snapshot_into
    return tracker


def _finish_tracking(tracker, loop, config: RunConfig) -> None:
    """Deliver the buffered records (a bounded wait), then the model and the run's end; one
    line, and nothing lost, when the server does not answer in time."""
    from raytrain_at.tracking.buffered import FINAL_FLUSH_S

    if not tracker.flush(FINAL_FLUSH_S):
        user_line(f"MLflow at {tracker.where} did not answer within {FINAL_FLUSH_S:.0f} s: "
                  f"the run's model, its end and {tracker.pending} tracking records are not "
                  f"logged (the records are kept in {tracker.journal} and the last "
                  "checkpoint); run the same command again to resume the run and send them")
        tracker.close()
        return
    _log_final_artifacts(tracker, loop, config)
    tracker.finish()


def _mark_failed(tracker) -> None:
    """End the MLflow run FAILED, briefly; a failure here is logged, never raised, so the
    error that failed the run is the one that propagates."""
    from raytrain_at.tracking.buffered import FAILED_FLUSH_S

    try:
        tracker.finish("FAILED", timeout_s=FAILED_FLUSH_S)
    except Exception as exc:  # noqa: BLE001 - the run's own error matters more
        log.warning("could not mark the MLflow run FAILED: %s", first_lines(str(exc)))


def earlier_checkpoints(latest) -> list:
    """The run's checkpoints older than ``latest`` (a ``ray.train.Checkpoint``), newest first.

    Ray Train keeps them beside it in the run folder (local or in the cloud) as
    ``checkpoint_<date and time>``, names that sort by time; they are listed on the
    checkpoint's own filesystem, whatever Ray's controller remembers after a restart.
    """
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    parent, name = posixpath.split(latest.path.rstrip("/"))
    entries = latest.filesystem.get_file_info(FileSelector(parent))
    names = sorted((entry.base_name for entry in entries
                    if entry.type == FileType.Directory
                    and entry.base_name.startswith("checkpoint_") and entry.base_name < name),
                   reverse=True)
    return [ray.train.Checkpoint(posixpath.join(parent, older), filesystem=latest.filesystem)
            for older in names]


def _progress_reporter(tracker, run_name: str):
    """Rank 0's per-step hook: a progress line for the console and step metrics for MLflow."""

    def on_progress(progress) -> None:
        user_line(progress_line(progress, run_name), transient=True)
        tracker.log_metrics({"step_loss": progress.loss, "step_accuracy": progress.accuracy,
                             "step_images_per_s": progress.images_per_s,
                             "step_lr": progress.lr}, step=progress.global_step)

    return on_progress


def _log_final_artifacts(tracker, loop, config: RunConfig) -> None:
    """The run's model (the selected epoch's weights) as ``model``, also as a plain MLflow
    model; the last epoch's as ``final_model`` (the project's file only); what selected it; and
    the resolved config (YAML)."""
    import yaml

    from raytrain_at.model_refs import log_model_artifacts
    from raytrain_at.models.model_files import MODEL_FILE, save_model_file
    from raytrain_at.training.loop import training_metadata

    source = {"raytrain_at.source_run": tracker.run_id}
    with tempfile.TemporaryDirectory() as tmp:
        selected = loop.save_selected(Path(tmp) / "selected" / MODEL_FILE, source)
        log_model_artifacts(tracker, tracker.run_id, selected, "model")
        final = save_model_file(Path(tmp) / "final" / MODEL_FILE, loop.eval_model,
                                loop.model_spec,
                                dict(training_metadata(config, loop.epoch), **source))
        tracker.log_file(final, "final_model")
    selection = loop.selection
    tracker.set_tags({"raytrain_at.selected_by": loop.selected_by,
                      "raytrain_at.selected_epoch": selection.epoch})
    tracker.log_text(yaml.safe_dump(redacted_config_dump(config.model_dump(mode="json")),
                                    sort_keys=False), "config.yaml")


def run_single_process(prepared: PreparedRun) -> dict[str, float]:
    """The same worker loop in this process, without Ray (world size 1): for benchmarks on a
    machine without Ray and for debugging. Checkpoints go to the storage folder; no resume."""
    import deepspeed

    from raytrain_at.training.loop import WorkerLoop, WorkerPlace

    if prepared.config.scaling.num_workers != 1:
        raise UserError("--single-process runs one worker: set scaling.num_workers=1 "
                        "(or --num-workers 1)")
    single_rank_environment(keep_existing=True)
    use_gpu = prepared.config.scaling.use_gpu
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    prepare_worker_device(use_gpu, device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    loop = WorkerLoop(prepared.config, WorkerPlace(0, 1, device), prepared.train_path,
                      prepared.heldout_path)
    last: dict[str, float] = {}

    def report(metrics: dict[str, float], directory: Path | None) -> None:
        last.update(metrics)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()), flush=True)

    loop.run(report, Path(prepared.storage_path) / prepared.run_name / "single-process")
    return last


def quiet_ray_internals() -> None:
    """Ray worker-process setup hook: Ray Train's placement-group cleaner polls the State API,
    which is not running when Ray starts without its dashboard (as here), and logs a warning on
    every poll; keep its errors only."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def launch(prepared: PreparedRun, *, address: str | None = None):
    """Run the prepared job on Ray Train; returns Ray's ``Result``.

    All worker output goes to ``<run folder>/console.log`` (also logged to the MLflow run);
    the console shows rank 0's progress and epoch lines (everything with ``-v``).
    """
    if (prepared.config.scaling.use_gpu and not torch.cuda.is_available()
            and address is None):
        raise UserError("scaling.use_gpu is true but this machine has no GPU (use --address "
                        "for a cluster, or --set scaling.use_gpu=false)")
    init_ray(address)
    require_shared_root("set" if prepared.shared_storage else None, "training")
    log_path = run_folder(prepared) / "console.log"
    from ray.train import TrainingFailedError

    with worker_log_file(log_path), sigterm_stops_gracefully() as stop:
        try:
            result = build_trainer(prepared).fit()
        except BaseException as exc:
            if stop.signal is not None:  # whatever Ray raised on its way down
                _stopped_by_signal(prepared, stop.signal, exc)
            if isinstance(exc, TrainingFailedError):
                # Ray's message runs to a hundred lines (memory tables, actor lists): one line
                # here, everything in the log.
                line = failure_line(exc)
                end_tracking_run(prepared, "FAILED", line)
                raise RunFailed(f"run {prepared.run_name} failed: {line} (the "
                                f"workers' full output is in {log_path})") from exc
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                end_tracking_run(prepared, "KILLED", "the driver was interrupted")
            else:
                end_tracking_run(prepared, "FAILED", first_lines(str(exc)))
                log.error("the workers' full output is in %s", log_path)
            raise
        if stop.signal is not None:
            _stopped_by_signal(prepared, stop.signal, None)
    _attach_console_log(prepared, log_path)
    return result


def _stopped_by_signal(prepared: PreparedRun, signum: int, cause: BaseException | None) -> None:
    """Ray aborted the run on SIGTERM: KILLED in MLflow, one line. A checkpoint cut short fails
    its checksums, so the resume takes the last complete one."""
    end_tracking_run(prepared, "KILLED", f"stopped by signal {signum}")
    raise RunFailed(f"run {prepared.run_name} stopped by signal {signum}: the same command "
                    "resumes it from its last complete checkpoint") from cause


def failure_line(error: BaseException) -> str:
    """One line for a failed Ray Train run: a stop decided by the failure budget, or a worker
    error that is not retried, in its own words; otherwise the first lines of Ray's message."""
    from ray.train import ControllerError

    if isinstance(error, ControllerError) and isinstance(error.controller_failure,
                                                         RetriesStopped):
        return str(error.controller_failure)
    return first_lines(str(error))


@dataclass
class _Stop:
    signal: int | None = None


@contextmanager
def sigterm_stops_gracefully() -> Iterator[_Stop]:
    """While the block runs (main thread only), SIGTERM (a spot reclaim of the driver's node,
    a job manager's stop) aborts the run as Ctrl-C does: Ray Train's own SIGINT handler (set by
    ``fit``) asks its controller to stop the workers; before ``fit`` it interrupts. The
    yielded object records the signal."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigterm(signum, frame) -> None:
        stop.signal = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    previous_term, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(
        signal.SIGINT)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)  # Ray's handler refers to a finished run


def end_tracking_run(prepared: PreparedRun, status: str, error: str) -> None:
    """Mark the run's MLflow run ``status`` (FAILED, KILLED) with the error as the tag
    ``raytrain_at.error``, unless it has ended already (rank 0 marks its own failures), so
    no failed run stays RUNNING. Best effort: the run's own error is what the user must see."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    from raytrain_at.tracking.runs import find_run_id

    try:
        client = MlflowClient(tracking_uri=prepared.tracking_uri)
        run_id = find_run_id(prepared.tracking_uri, prepared.config.tracking.experiment,
                             prepared.run_name)
        client.set_tag(run_id, ERROR_TAG, error[:5000])
        if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
            client.set_terminated(run_id, status=status)
    except LookupError:
        pass  # no worker got as far as opening the run
    except Exception as exc:  # noqa: BLE001 - keep the run's own error
        log.warning("could not mark the MLflow run of %s %s: %s", prepared.run_name, status,
                    exc)


def run_folder(prepared: PreparedRun) -> Path:
    """The run's local folder (Ray Train's, unless its storage is in the cloud)."""
    if "://" in prepared.storage_path:
        return default_home() / "runs" / prepared.run_name
    return Path(prepared.storage_path) / prepared.run_name


def _attach_console_log(prepared: PreparedRun, path: Path) -> None:
    """Keep the run's full worker output with its MLflow run too (best effort: the file stays
    in the run folder whatever happens)."""
    from raytrain_at.tracking.runs import log_file_to_run

    if not path.is_file():  # Ray was started by the caller, without our output handler
        return
    try:
        log_file_to_run(prepared.tracking_uri, prepared.config.tracking.experiment,
                        prepared.run_name, path, "logs")
    except Exception as exc:  # noqa: BLE001 - the training itself succeeded
        log.warning("could not attach %s to the MLflow run: %s", path, exc)


def scaling_config(config: RunConfig):
    """Ray Train's ``ScalingConfig`` of a run: what it asks Ray for, placed as
    ``scaling.placement`` says (:mod:`raytrain_at.training.placement`).

    Raises:
        UserError: ``strict_pack`` for a job that no known node of the cluster can hold.
    """
    from ray.train import ScalingConfig

    from raytrain_at.training.placement import cluster_nodes, placement_strategy

    scaling = config.scaling
    wants_nodes = scaling.placement == "strict_pack" or (scaling.placement == "auto"
                                                        and scaling.use_gpu)
    nodes = cluster_nodes() if wants_nodes else None
    strategy = placement_strategy(scaling.placement, num_workers=scaling.num_workers,
                                  use_gpu=scaling.use_gpu,
                                  cpus_per_worker=scaling.cpus_per_worker, nodes=nodes)
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                         resources_per_worker={"CPU": scaling.cpus_per_worker},
                         placement_strategy=strategy)


def build_trainer(prepared: PreparedRun, callbacks: list | None = None):
    """The ``TorchTrainer`` of a prepared run (Ray must be initialised).

    Args:
        prepared: the validated run.
        callbacks: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` inside a trial.
    """
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig,
                           RunConfig as RayRunConfig)
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytrain_at.tracking.experiments import prepare_experiment
    from raytrain_at.training.failure_budget import FailureBudgetCallback

    config = prepared.config
    # Created here, before any worker starts, with a location derived from the tracking URI:
    # a worker creating it would root its artifacts in Ray's temporary session folder.
    prepare_experiment(prepared.tracking_uri, config.tracking.experiment)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=prepared.worker_payload(),
        scaling_config=scaling_config(config),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=prepared.run_name, storage_path=prepared.storage_path,
            # Ray's type says UserCallback; its trainer hands other RayTrainCallbacks (such
            # as this controller callback) to the controller as they are.
            callbacks=cast(list, [FailureBudgetCallback(config.scaling.max_failures_per_hour),
                                  *(callbacks or [])]),
            # Ray Train's own logs at WARNING unless -v (its worker lines reach console.log
            # whatever the level; the console shows rank 0's lines only).
            logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
            # Ray retries without limit; the callback keeps to the hourly budget and stops
            # at once on a failure that a retry would repeat (.failure_budget).
            failure_config=FailureConfig(max_failures=-1),
            # Ray keeps the best two by score and always the latest: the score ranks the
            # checkpoints holding selected weights first (.selection.checkpoint_score), so
            # the one holding the current selection stays, which later ones only point to.
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max")),
    )
