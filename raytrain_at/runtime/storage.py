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

import fcntl
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    """One-line errors for an object store that does not answer, a bucket that is missing, or a
    local folder that cannot be created (checked without creating it: nothing is written yet)."""
    if "://" not in root:
        _check_local_root(root)
        return
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


def _check_local_root(root: str) -> None:
    """The nearest existing folder above ``root`` must be a writable folder."""
    path = Path(root).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        raise UserError(f"storage root {root} cannot be created ({existing} {what}): set "
                        "--storage-path or tracking.storage_path to a writable folder")


# Conditional writes: what a lease needs (create only when absent; replace only what was read).
# pyarrow's S3 file system has no conditional PUT, so S3 goes through boto3, whose
# ``If-None-Match: *`` / ``If-Match: ETAG`` headers AWS S3 honours since 2024 (as does moto). An
# S3-compatible store that ignores them makes the lease a best effort: two drivers that start in
# the same second could both hold it (their units are idempotent, so results stay equal).
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


@functools.lru_cache(maxsize=4)
def _boto_s3(endpoint: str | None, region: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1",
                        config=Config(connect_timeout=5, read_timeout=30,
                                      retries={"max_attempts": 3, "mode": "standard"}))


def _bucket_key(uri: str) -> tuple:
    bucket, _, key = uri[len("s3://"):].partition("/")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return _boto_s3(os.environ.get("AWS_ENDPOINT_URL"), region), bucket, key


def _refused(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _PRECONDITION_CODES or status in _PRECONDITION_CODES


def read_versioned(path: str) -> tuple[bytes, str] | None:
    """``(content, version tag)`` of a small file (local or ``s3://``), None when absent. The tag
    (an S3 ETag; a local file's inode, size and mtime) is what :func:`replace_if_unchanged`
    compares."""
    if path.startswith("s3://"):
        from botocore.exceptions import ClientError

        client, bucket, key = _bucket_key(path)
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read(), str(answer["ETag"])
    local = Path(path)
    try:
        data = local.read_bytes()
        tag = _local_tag(local)
    except FileNotFoundError:
        return None
    return data, tag


def _local_tag(local: Path) -> str:
    stat = local.stat()
    return f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_durably(local: Path, data: bytes) -> None:
    """Replace ``local`` atomically and durably: a temporary file written and fsynced, renamed
    into place, and its folder fsynced (so a power loss leaves the old file or the new, and the
    rename itself survives)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, local)
    _fsync_folder(local.parent)


def create_if_absent(path: str, data: bytes) -> str | None:
    """Write ``path`` only if nothing is there (atomic on a local disk and on S3): its version
    tag (see :func:`read_versioned`), or None when something already was."""
    if path.startswith("s3://"):
        from botocore.exceptions import ClientError

        client, bucket, key = _bucket_key(path)
        try:
            answer = client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if _refused(exc):
                return None
            raise
        return str(answer["ETag"])
    local = Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.new")
    tmp.write_bytes(data)
    try:
        os.link(tmp, local)  # atomic, and fails when the name exists
    except FileExistsError:
        return None
    finally:
        tmp.unlink()
    _fsync_folder(local.parent)
    return _local_tag(local)


def replace_if_unchanged(path: str, data: bytes, tag: str) -> str | None:
    """Overwrite ``path`` only if it still has the version ``tag`` read before: the new tag, or
    None when it changed (or vanished) in between. Local files: the compare and the rename are
    serialised by an exclusive lock on ``path.lock`` (``flock``; on a shared folder, as good as
    its lock support)."""
    if path.startswith("s3://"):
        from botocore.exceptions import ClientError

        client, bucket, key = _bucket_key(path)
        try:
            answer = client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        except ClientError as exc:
            if _refused(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise
        return str(answer["ETag"])
    local = Path(path)
    with _local_version_lock(local):
        current = read_versioned(path)
        if current is None or current[1] != tag:
            return None
        write_durably(local, data)
        return _local_tag(local)


def delete_if_unchanged(path: str, tag: str) -> bool:
    """Remove ``path`` if it still has version ``tag`` (S3: ``If-Match`` on the delete where the
    store supports it; a store that rejects the header gets a plain delete)."""
    if path.startswith("s3://"):
        from botocore.exceptions import ClientError

        client, bucket, key = _bucket_key(path)
        try:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=tag)
        except ClientError as exc:
            if _refused(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise
        return True
    local = Path(path)
    with _local_version_lock(local):
        current = read_versioned(path)
        if current is None or current[1] != tag:
            return False
        local.unlink()
        return True


@contextmanager
def _local_version_lock(local: Path) -> Iterator[None]:
    """Hold the exclusive lock beside ``local`` (``NAME.lock``) while the block compares its
    version and changes it: the compare-and-set of a local file is atomic among processes."""
    with open(local.with_name(local.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
