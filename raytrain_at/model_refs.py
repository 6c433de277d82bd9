"""MODEL_REF: the one way commands name a model, and the MLflow forms of a model file.

A reference is a model file (``model.safetensors`` with its spec), a folder holding one (a
training checkpoint), ``runs:/RUN_ID/model`` (a training run's selected weights in MLflow),
``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (the registry) or ``run:EXPERIMENT/RUN_NAME``
(the latest run of that name's model: how an adversarial recipe names its clean pre-training,
whose ``model`` is already the selected epoch). Every form ends in the same safetensors file and
is rebuilt through the timm registry, never by unpickling.

The other way round, :func:`log_model_artifacts` and :func:`write_mlflow_model` give a model file
its MLflow form: the file itself plus a standard MLflow ``pytorch`` model in the ``pt2`` format
(a ``torch.export`` program of the model in evaluation mode), which ``mlflow.pytorch.load_model``,
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load without this project and without
unpickling. The program takes a float32 batch of ``3 x R x R`` images in [0, 1] at the model's
own resolution ``R`` (normalisation is inside) and returns logits; its signature says so.

This module sits above :mod:`raytrain_at.models` (model files, no MLflow) and
:mod:`raytrain_at.tracking` (MLflow runs, no models): the one place where the two meet, so
neither of them imports the other.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from raytrain_at.errors import UserError
from raytrain_at.models.model_files import (MODEL_FILE, SPEC_KEY, LoadedModel, ModelSpec,
                                           load_model_file)

if TYPE_CHECKING:  # mlflow is imported where it is used: it takes seconds
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

__all__ = ["init_normalisation", "is_mlflow_reference", "load_model", "local_model_file",
           "local_weights", "log_model_artifacts", "resolve_model", "resolve_version",
           "write_mlflow_model"]

REFERENCE_PREFIXES = ("runs:/", "models:/", "run:")


def is_mlflow_reference(reference: str) -> bool:
    """Whether ``reference`` names a model in MLflow (``runs:/``, ``models:/``, ``run:``)."""
    return reference.startswith(REFERENCE_PREFIXES)


# --------------------------------------------------------------------------- MLflow look-ups
def find_model_run_id(tracking_uri: str, experiment: str, run_name: str) -> str:
    """The run a ``run:EXPERIMENT/RUN_NAME`` reference names: the latest FINISHED run of this
    tool (its ``raytrain_at.run_name`` tag) with that name, created by this process's user
    (:func:`raytrain_at.tracking.creator.run_creator`). A run that merely carries the name,
    still RUNNING or FAILED, or made by someone else is never the answer: an adversarial
    recipe would otherwise start from whatever weights such a run holds.

    Raises:
        LookupError: no such run; the message says what the near misses lack.
    """
    from mlflow.tracking import MlflowClient

    from raytrain_at.tracking.creator import MLFLOW_USER, run_creator
    from raytrain_at.tracking.runs import RUN_NAME_TAG

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow run named {run_name!r} in experiment {experiment!r}")
    creator = run_creator()
    if "'" in run_name + creator:  # a filter string literal cannot hold one
        raise LookupError(f"no MLflow run named {run_name!r} by {creator!r}")
    named = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    wanted = (f"{named} and attributes.status = 'FINISHED' and "
              f"tags.`{MLFLOW_USER}` = '{creator}'")
    runs = client.search_runs([found.experiment_id], filter_string=wanted, max_results=1,
                              order_by=["attributes.start_time DESC"])
    if runs:
        return runs[0].info.run_id
    near = client.search_runs([found.experiment_id], filter_string=named, max_results=5)
    if not near:
        raise LookupError(f"no MLflow run named {run_name!r} in experiment {experiment!r}")
    seen = ", ".join(f"{run.info.status} by {run.data.tags.get(MLFLOW_USER, 'nobody')}"
                     for run in near)
    raise LookupError(f"no FINISHED run named {run_name!r} by {creator!r} in experiment "
                      f"{experiment!r} (runs of that name: {seen})")


def run_name_reference(reference: str, tracking_uri: str) -> str:
    """``run:EXPERIMENT/RUN_NAME`` -> ``runs:/RUN_ID/model``: the model (selected epoch) of the
    latest finished run of that name by this user (:func:`find_model_run_id`), e.g. a clean
    pre-training an adversarial recipe starts from."""
    experiment, sep, name = reference[len("run:"):].partition("/")
    if not (sep and experiment and name):
        raise UserError(f"{reference!r}: a run-name reference is run:EXPERIMENT/RUN_NAME")
    try:
        run_id = find_model_run_id(tracking_uri, experiment, name)
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
    """Download what an MLflow ``reference`` names and return the local path (file or folder).

    Raises:
        UserError: an unknown run, model, version or alias, or a server that does not answer.
    """
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


# --------------------------------------------------------------------------- local files
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


def local_weights(source: str | None) -> str | None:
    """A weights source (``model.pretrained`` / ``model.init``) as the model loaders take it:
    an MLflow reference becomes its downloaded model file; ``hub:NAME`` and paths stay."""
    if source is None or not is_mlflow_reference(source):
        return source
    return str(local_model_file(source))


@contextmanager
def named_as(reference: str | None, local: str | None) -> Iterator[None]:
    """Errors raised about ``local``, the downloaded copy of ``reference``, name the reference
    the user gave instead of a temporary path."""
    try:
        yield
    except UserError as exc:
        if reference is None or local is None or reference == local:
            raise
        raise UserError(str(exc).replace(local, reference)) from None


def init_normalisation(init: str | None
                       ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation a run's initial model file records, if it records one (None for
    clean checkpoints and for model files that use their backbone's configuration)."""
    if init is None or init.startswith("hub:"):
        return None
    path = Path(local_weights(init) or init).expanduser()
    if path.is_dir():
        path = path / MODEL_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(SPEC_KEY)
    except (SafetensorError, OSError):
        return None
    if text is None:
        return None
    spec = ModelSpec.from_json(text, str(path))
    if spec.mean is None and spec.std is None:
        return None
    reference = spec.build()  # fills in whichever of the two the file left to the cfg
    return (tuple(float(v) for v in reference.mean.flatten()),
            tuple(float(v) for v in reference.std.flatten()))


# --------------------------------------------------------------------------- loading
def resolve_model(reference: str, *, resolution: int | None = None,
                  device: str | torch.device = "cpu",
                  tracking_uri: str | None = None) -> LoadedModel:
    """The model ``reference`` names, in eval mode on ``device``, with its spec and hash."""
    path = local_model_file(reference, tracking_uri)
    return load_model_file(path, reference=reference, resolution=resolution, device=device)


def load_model(reference: str, *, resolution: int | None = None,
               device: str | torch.device = "cpu", tracking_uri: str | None = None) -> nn.Module:
    """The module ``reference`` names, ready for evaluation (eval mode, [0, 1] inputs).

    Example:
        >>> model = raytrain_at.load_model("models:/convnext-tiny-cvst@champion-linf")
    """
    return resolve_model(reference, resolution=resolution, device=device,
                         tracking_uri=tracking_uri).module


# --------------------------------------------------------------------------- MLflow models
def input_example(resolution: int, batch: int = 2) -> np.ndarray:
    """A mid-grey batch at the model's side. Two images, because ``torch.export`` makes a
    dimension of size one static, and the served model must take any batch size."""
    return np.full((batch, 3, resolution, resolution), 0.5, dtype=np.float32)


def _requirements() -> list[str]:
    """What the exported program needs: torch and MLflow, without local build labels (a
    ``+cu130`` suffix would make every other torch build report a mismatch)."""
    import mlflow

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

    loaded = load_model_file(model_file)
    folder = Path(folder)
    try:
        # mlflow has no __all__ naming its submodules.
        mlflow.pytorch.save_model(  # pyright: ignore[reportPrivateImportUsage]
            loaded.module.eval(), str(folder),
            input_example=input_example(loaded.spec.resolution), serialization_format="pt2",
            pip_requirements=_requirements(),
            metadata={SPEC_KEY: loaded.spec.to_json(),  # as in the model file
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
