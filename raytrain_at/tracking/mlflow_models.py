"""Models that plain MLflow loads: an exported program beside the project's own model file.

The project keeps a model as ``model.safetensors`` with its spec (rebuilt through the timm
registry, see :mod:`raytrain_at.models.model_files`). That needs ``raytrain_at`` installed, so
next to it every logged model also holds a standard MLflow ``pytorch`` model in the ``pt2``
format: a ``torch.export`` program of the model in evaluation mode, which loads with
``mlflow.pytorch.load_model`` or ``mlflow.pyfunc.load_model`` (and ``mlflow models serve``) in an
environment without this project, and never unpickles. The program takes a float32 batch of
``3 x R x R`` images in [0, 1] at the model's own resolution ``R`` (normalisation is inside) and
returns logits; the signature and input example say so.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

SPEC_METADATA_KEY = "raytrain_at.model_spec"


def input_example(resolution: int, batch: int = 2) -> np.ndarray:
    """A mid-grey batch at the model's side. Two images, because ``torch.export`` makes a
    dimension of size one static, and the served model must take any batch size."""
    return np.full((batch, 3, resolution, resolution), 0.5, dtype=np.float32)


def _requirements() -> list[str]:
    """What the exported program needs: torch and MLflow, without local build labels (a
    ``+cu130`` suffix would make every other torch build report a mismatch)."""
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def write_mlflow_model(model_file: str | Path, folder: str | Path) -> Path:
    """Write an MLflow model of ``model_file`` into ``folder`` (which must not exist yet),
    with a copy of the model file itself.

    Args:
        model_file: a project model file (``model.safetensors`` with its spec).
        folder: the new MLflow model folder.

    Returns:
        ``folder``.
    """
    import mlflow.pytorch

    from raytrain_at.models.model_files import MODEL_FILE, load_model_file

    loaded = load_model_file(model_file)
    folder = Path(folder)
    try:
        # mlflow has no __all__ naming its submodules.
        mlflow.pytorch.save_model(  # pyright: ignore[reportPrivateImportUsage]
            loaded.module.eval(), str(folder),
            input_example=input_example(loaded.spec.resolution), serialization_format="pt2",
            pip_requirements=_requirements(),
            metadata={SPEC_METADATA_KEY: loaded.spec.to_json(),
                      "input": "float32 images in [0, 1], shape (batch, 3, side, side)",
                      "weights_sha256": loaded.weights_sha256})
    except Exception as exc:  # noqa: BLE001 - torch.export refuses some models; say which
        raise UserError(f"{model_file}: {loaded.spec.name} cannot be exported as an MLflow "
                        f"pt2 model ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200]})") from None
    shutil.copy2(model_file, folder / MODEL_FILE)
    return folder


def log_model_artifacts(target: Any, run_id: str, model_file_path: str | Path,
                        artifact_path: str = "model") -> None:
    """Log a model file and its plain-MLflow model under ``artifact_path`` of a run.

    Afterwards ``runs:/RUN_ID/model`` loads with ``mlflow.pytorch.load_model`` as well as with
    ``raytrain_at.load_model`` (which reads the ``model.safetensors`` in the same folder).

    Args:
        target: an ``MlflowClient``, or anything with a ``client`` attribute holding one (a
            :class:`raytrain_at.tracking.runs.TrainingRun`).
        run_id: the run to log to.
        model_file_path: the project's model file.
        artifact_path: the folder in the run's artifacts.
    """
    client = getattr(target, "client", target)
    # The project's file first: a model torch.export refuses still leaves the run its weights.
    client.log_artifact(run_id, str(model_file_path), artifact_path)
    with tempfile.TemporaryDirectory(prefix="raytrain-at-mlflow-model-") as tmp:
        folder = write_mlflow_model(model_file_path, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(folder), artifact_path)
