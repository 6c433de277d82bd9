"""Fetch model files named by MLflow references (``runs:/RUN_ID/path``, ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, and ``run:EXPERIMENT/RUN_NAME``: a training run's model by the stable
name a recipe gives it) into a local folder, with one-line errors for unknown runs, models,
versions and aliases, and for a tracking server that does not answer."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from raytrain_at.errors import UserError

if TYPE_CHECKING:  # mlflow is imported where it is used: it takes seconds
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient


REFERENCE_PREFIXES = ("runs:/", "models:/", "run:")


def is_mlflow_reference(reference: str) -> bool:
    return reference.startswith(REFERENCE_PREFIXES)


def run_name_reference(reference: str, tracking_uri: str) -> str:
    """``run:EXPERIMENT/RUN_NAME`` -> ``runs:/RUN_ID/model``: the model (selected epoch) of the
    latest run of that name, e.g. a clean pre-training an adversarial recipe starts from."""
    from raytrain_at.tracking.runs import find_run_id

    experiment, sep, name = reference[len("run:"):].partition("/")
    if not (sep and experiment and name):
        raise UserError(f"{reference!r}: a run-name reference is run:EXPERIMENT/RUN_NAME")
    try:
        run_id = find_run_id(tracking_uri, experiment, name)
    except LookupError as exc:
        raise UserError(f"{reference!r}: {exc} (train its recipe first)") from None
    return f"runs:/{run_id}/model"


def resolve_version(client: MlflowClient, reference: str) -> ModelVersion:
    """The model version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
    from mlflow.exceptions import MlflowException

    body = reference.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, number = body.partition("/")
        return client.get_model_version(name, number)
    except MlflowException as exc:
        raise UserError(f"{reference!r}: {str(exc).splitlines()[0]}") from None


def _registry_download_uri(reference: str, tracking_uri: str) -> str:
    """The artifact URI of the version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names,
    looked up in the registry at ``tracking_uri`` (MLflow's own ``models:/`` resolution uses the
    process-wide registry URI and ignores an explicit one)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = resolve_version(client, reference)
    try:
        return client.get_model_version_download_uri(version.name, str(version.version))
    except MlflowException as exc:
        raise UserError(f"{reference!r}: {str(exc).splitlines()[0]}") from None


def _scratch_dir() -> Path:
    """A temporary folder removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="raytrain-at-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def download(reference: str, tracking_uri: str | None = None,
             destination: str | Path | None = None) -> Path:
    """Download what ``reference`` names and return the local path (file or folder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # A model folder is a few files: MLflow's per-file progress bar only adds a dozen lines to
    # the console of every command that loads a runs:/ or models:/ reference.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from raytrain_at.tracking.experiments import check_tracking_server

    uri = tracking_uri or mlflow.get_tracking_uri()
    check_tracking_server(uri)
    if reference.startswith("run:"):
        reference = run_name_reference(reference, uri)
    target = Path(destination) if destination else _scratch_dir()
    if reference.startswith("runs:/") and len(reference.rstrip("/").split("/")) < 3:
        raise UserError(f"{reference!r}: a run reference is runs:/RUN_ID/ARTIFACT_PATH "
                        "(a training run's model is runs:/RUN_ID/model)")
    source = _registry_download_uri(reference, uri) if reference.startswith("models:/") \
        else reference
    try:
        # mlflow has no __all__ naming its submodules.
        local = mlflow.artifacts.download_artifacts(  # pyright: ignore[reportPrivateImportUsage]
            artifact_uri=source, dst_path=str(target), tracking_uri=uri)
    except MlflowException as exc:
        first = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[0]
        raise UserError(f"{reference!r}: {first}") from None
    except OSError as exc:
        raise UserError(f"{reference!r}: {exc}") from None
    return Path(local)
