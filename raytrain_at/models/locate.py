"""Where a model reference's file is on this machine (MLflow references are downloaded first).

It sits below the model loaders (weights, model files) and above nothing of theirs, so both can
accept ``runs:/`` and ``models:/`` names without an import cycle through the MLflow layer.
"""

from __future__ import annotations

from pathlib import Path

from raytrain_at.errors import UserError
from raytrain_at.tracking.artifacts import download, is_mlflow_reference

MODEL_FILE = "model.safetensors"


def local_model_file(reference: str, tracking_uri: str | None = None) -> Path:
    """The local model file ``reference`` names (MLflow references are downloaded first)."""
    if is_mlflow_reference(reference):
        path = download(reference, tracking_uri)
    else:
        path = Path(reference).expanduser()
        if not path.exists():
            raise UserError(f"model reference {reference!r}: no such file or folder (expected "
                            "a model.safetensors, a checkpoint folder, runs:/... or models:/...)")
    if path.is_dir():
        found = path / MODEL_FILE
        if not found.is_file():
            nested = sorted(path.rglob(MODEL_FILE))
            if len(nested) != 1:
                raise UserError(f"model reference {reference!r}: no {MODEL_FILE} in the folder"
                                if not nested else f"model reference {reference!r}: "
                                f"{len(nested)} model files below it; name one")
            found = nested[0]
        path = found
    return path
