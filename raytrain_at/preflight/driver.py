"""The checks the driver makes before any worker starts: storage, MLflow, weights, data."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from raytrain_at.config import RunConfig
from raytrain_at.data.provenance import read_provenance
from raytrain_at.errors import UserError
from raytrain_at.models.pixel_space import normalisation_of
from raytrain_at.preflight.checks import Check, blocked, passed
from raytrain_at.runtime.storage import check_root, filesystem
from raytrain_at.tracking.experiments import check_tracking_server
from raytrain_at.tracking.redact import without_userinfo
from raytrain_at.training.loop import build_model_and_report

log = logging.getLogger(__name__)


def check_storage(root: str) -> Check:
    """A probe file written under ``root``, read back and deleted (local folder or s3://)."""
    try:
        check_root(root)
    except UserError as exc:
        return blocked("storage", str(exc))
    fs, base = filesystem(root)
    probe = f"{base.rstrip('/')}/.preflight-{uuid.uuid4().hex}"
    payload = b"raytrain-at preflight probe"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(payload)
        with fs.open_input_stream(probe) as stream:
            back = stream.read()
        fs.delete_file(probe)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:160]
        return blocked("storage", f"storage root {root} does not take a write, read and delete "
                       f"({reason}): set --storage-path or tracking.storage_path to a writable "
                       "folder or bucket")
    if back != payload:
        return blocked("storage", f"storage root {root} returned other bytes than written")
    return passed("storage", "ok", f"write, read, delete under {root}")


def check_mlflow(uri: str) -> Check:
    """The tracking server answers its health check and a search (MLflow's client sends the
    basic-auth account of MLFLOW_TRACKING_USERNAME / _PASSWORD where set)."""
    import mlflow

    try:
        check_tracking_server(uri)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except UserError as exc:
        return blocked("mlflow", str(exc))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; one line for each
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return blocked("mlflow", f"MLflow at {without_userinfo(uri)} refuses a search "
                       f"({reason}): check MLFLOW_TRACKING_USERNAME / _PASSWORD")
    account = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return passed("mlflow", "ok", f"{without_userinfo(uri)}"
                  + (f" as {account}" if account else ""))


def check_weights(config: RunConfig) -> Check:
    """The starting weights load completely and bring their normalisation (the loader's own
    checks: a missing or unexpected tensor fails the load)."""
    try:
        model, report = build_model_and_report(config)
    except UserError as exc:
        return blocked("weights", str(exc))
    except Exception as exc:  # noqa: BLE001 - a damaged file raises whatever its reader does
        source = config.model.init or config.model.pretrained
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return blocked("weights", f"the starting weights {source} do not load ({reason}): "
                       "replace the file or set model.init / model.pretrained")
    if report is None:
        return passed("weights", "random init", f"{config.model.name}: no starting weights")
    norm = normalisation_of(model)
    if norm is None:
        return blocked("weights", f"{config.model.name} has no pixel-space normalisation")
    mean, std = norm
    if report.mean is not None and tuple(round(v, 4) for v in report.mean) != tuple(
            round(v, 4) for v in mean):
        return blocked("weights", f"{report.source} was trained with mean {report.mean}, the "
                       f"model normalises with {tuple(mean)}")
    return passed("weights", "ok", f"{report.summary()}; mean {_short(mean)} std {_short(std)}"
                  f" ({report.normalisation_from or 'timm cfg'})")


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def check_data(train: str, heldout: str | None) -> Check:
    """The files exist with their provenance (the launch's own validation ran before this, so
    the checksums hold and the held-out file is not from a test split)."""
    parts = []
    for key, path in (("train", train), ("heldout", heldout)):
        if path is None:
            parts.append(f"{key}: none")
            continue
        record = read_provenance(path) or {}
        source = record.get("source") or record.get("dataset") or "?"
        split = record.get("split") or "?"
        size = Path(path).stat().st_size / 2**20
        parts.append(f"{key}: {Path(path).name} ({size:.1f} MiB, {source} {split})")
    return passed("data", "ok", "; ".join(parts))
