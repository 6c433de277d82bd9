"""Where the project keeps its files: one storage root for training, evaluation state and Tune.

Two places, on purpose:

* the **home** (``$RAYTRAIN_AT_HOME`` or ``~/.raytrain_at``): this machine's own files, such as the
  bundled datasets written to FFCV and console logs;
* the **storage root**: what every node of a cluster must see (Ray Train checkpoints, Tune
  results, the sharded evaluation's chunk records). It is the command's ``--storage-path``, else
  the config's ``tracking.storage_path``, else ``$RAYTRAIN_AT_STORAGE`` (what ``node_env.sh``
  writes on a cluster: ``s3://BUCKET/raytrain-at``), else the home on a single machine.

A run on a Ray cluster of several nodes without an explicit root stops before any work: the
home is node-local there, so a worker's checkpoint or chunk record would be invisible to the
driver (the failure this module exists to prevent). ``s3://`` roots are checked once (reachable
endpoint, existing bucket), so a wrong endpoint or bucket is one line, not a stuck run.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

STORAGE_ENV = "RAYTRAIN_AT_STORAGE"


def default_home() -> Path:
    """The project's node-local folder (not created here)."""
    return Path(os.environ.get("RAYTRAIN_AT_HOME", Path.home() / ".raytrain_at"))


def is_uri(root: str) -> bool:
    """Whether ``root`` is a URI (``s3://``, ``gs://``) rather than a local folder."""
    return "://" in root


def explicit_root(*candidates: str | None) -> str | None:
    """The first given root among ``candidates`` (option, config), else ``$RAYTRAIN_AT_STORAGE``;
    local folders made absolute, URIs without a trailing slash; None when nothing is set."""
    for value in (*candidates, os.environ.get(STORAGE_ENV) or None):
        if value:
            text = str(value)
            return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().absolute())
    return None


def storage_root(*candidates: str | None) -> str:
    """The storage root (see the module docstring); the home when nothing is set."""
    return explicit_root(*candidates) or str(default_home())


def alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (Ray must be initialised)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_root(root: str | None, what: str, nodes: int | None = None) -> None:
    """Stop a multi-node run whose storage root was not set.

    Args:
        root: the explicit root (:func:`explicit_root`), None when none was given.
        what: the command, for the message (``training``, ``evaluation``, ``the Tune study``).
        nodes: the cluster's alive nodes; None: ask Ray (which must be initialised).
    """
    if root is not None:
        return
    nodes = alive_nodes() if nodes is None else nodes
    if nodes > 1:
        raise UserError(f"{what} on a {nodes}-node Ray cluster needs a storage root "
                        f"every node sees: set {STORAGE_ENV} (or --storage-path) to "
                        "s3://BUCKET/PREFIX or a shared folder")


def filesystem(root: str):
    """``(pyarrow filesystem, path inside it)`` of a storage root.

    S3 honours ``AWS_ENDPOINT_URL`` (an S3-compatible store, e.g. the rehearsal's), with short
    timeouts and few retries, so a dead endpoint fails within seconds rather than minutes.
    """
    import pyarrow.fs as pafs

    if root.startswith("s3://"):
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        return (_s3(os.environ.get("AWS_ENDPOINT_URL"), region),
                root[len("s3://"):].rstrip("/"))
    if is_uri(root):
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).absolute())


@functools.lru_cache(maxsize=4)
def _s3(endpoint: str | None, region: str | None):
    """One S3 client per endpoint and region (chunk records are read many times a second)."""
    import pyarrow.fs as pafs

    options: dict = {"connect_timeout": 5.0, "request_timeout": 60.0,
                     "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if region:
        options["region"] = region
    if endpoint:
        options["endpoint_override"] = endpoint
    return pafs.S3FileSystem(**options)


def check_root(root: str) -> None:
    """One-line errors for an object store that does not answer or a bucket that is missing
    (local folders are created on first use and need no check)."""
    if not root.startswith("s3://"):
        return
    import pyarrow.fs as pafs

    bucket = root[len("s3://"):].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    fs, _ = filesystem(root)
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:160]
        raise UserError(f"storage root {root}: the object store at {endpoint} does not answer "
                        f"({reason})") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"storage root {root}: bucket {bucket!r} does not exist at {endpoint}")
