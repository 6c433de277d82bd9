"""MLflow experiments whose artifacts last: an absolute artifact location fixed at creation.

MLflow gives a new experiment of a local store the artifact root ``./mlruns`` resolved against the
*current folder of the process that creates it*. A Ray worker's current folder is Ray's session
folder under ``/tmp/ray``, so an experiment first created by a training worker would keep every
model of every later run in a folder Ray deletes. Every experiment the project creates therefore
goes through :func:`ensure_experiment`, which derives the location from the tracking URI alone:
next to a local SQLite database (``<db folder>/mlartifacts/<experiment>``), inside a file store,
or the tracking server's own (proxied) artifact root. The result does not depend on which process
asks, so the driver creating the experiment before workers start and a worker finding it later
agree.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
import urllib.error
import urllib.request
from urllib.parse import unquote, urlparse

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raytrain_at.errors import UserError
from raytrain_at.tracking.redact import without_userinfo

log = logging.getLogger(__name__)

ARTIFACT_FOLDER = "mlartifacts"


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative SQLite database or store folder made absolute (a worker with
    another current folder must reach the same store)."""
    if uri.startswith("sqlite:///"):
        path = unquote(uri[len("sqlite:///"):])
        if not path.startswith("/"):
            return "sqlite:///" + str(Path(path).resolve())
        return uri
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri).resolve().as_uri()
    return uri


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """One line when an ``http(s)://`` tracking server does not answer its health check (MLflow's
    own client retries for minutes before it says so); other stores need no server."""

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"MLflow tracking server {without_userinfo(uri)} does not answer "
                        f"({reason}): start it "
                        "(scripts/cluster/start_mlflow.sh on a cluster) or set "
                        "MLFLOW_TRACKING_URI") from None


def artifact_root(tracking_uri: str) -> Path | None:
    """The local folder under which new experiments of a local store keep artifacts, or None
    when the store decides itself (a server's proxied artifacts, a file store's own folder)."""
    uri = absolute_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):])).parent / ARTIFACT_FOLDER
    return None


def _folder_name(experiment: str) -> str:
    """A folder name for an experiment: readable, and unique through a short hash of the name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._")[:60] or "experiment"
    return f"{slug}-{hashlib.sha1(experiment.encode()).hexdigest()[:8]}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created with a durable artifact location if missing.

    Args:
        client: a client of the tracking store (its ``tracking_uri`` decides the location).
        name: the experiment name.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(client.tracking_uri)
    location = (root / _folder_name(name)).as_uri() if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # created by a parallel process meanwhile
        if found is None:
            raise
        return found.experiment_id


def prepare_experiment(tracking_uri: str, name: str) -> str:
    """Create (or find) experiment ``name`` in the store at ``tracking_uri``; its id.

    Raises:
        UserError: the store cannot be reached or refuses the experiment.
    """
    try:
        return ensure_experiment(MlflowClient(tracking_uri=tracking_uri), name)
    except MlflowException as exc:
        raise UserError(f"MLflow tracking store {without_userinfo(tracking_uri)}: "
                        f"{str(exc).strip().splitlines()[0]}") from None


def location_path(location: str) -> Path | None:
    """The local folder of an artifact location (``file:`` URI or path), None if remote."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else location))
    return None
