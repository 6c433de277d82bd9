"""Fetch model files named by MLflow references (``runs:/RUN_ID/path``, ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``) into a local folder, with one-line errors for unknown runs, models,
versions and aliases."""

from __future__ import annotations

import tempfile
from pathlib import Path

from raytrain_at.errors import UserError


def is_mlflow_reference(reference: str) -> bool:
    return reference.startswith(("runs:/", "models:/"))


def download(reference: str, tracking_uri: str | None = None,
             destination: str | Path | None = None) -> Path:
    """Download what ``reference`` names and return the local path (file or folder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    target = Path(destination or tempfile.mkdtemp(prefix="raytrain-at-model-"))
    if reference.startswith("runs:/") and len(reference.rstrip("/").split("/")) < 3:
        raise UserError(f"{reference!r}: a run reference is runs:/RUN_ID/ARTIFACT_PATH "
                        "(a training run's model is runs:/RUN_ID/model)")
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=reference, dst_path=str(target),
            tracking_uri=tracking_uri or mlflow.get_tracking_uri())
    except MlflowException as exc:
        first = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[0]
        raise UserError(f"{reference!r}: {first}") from None
    except OSError as exc:
        raise UserError(f"{reference!r}: {exc}") from None
    return Path(local)
