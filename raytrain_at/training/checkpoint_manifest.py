"""Checksums of a checkpoint's files, written with it and checked before a resume uses it.

Each rank writes its part of a checkpoint into a folder of its own, which Ray Train merges into
one checkpoint folder; so each rank records its own files, with their sizes and SHA-256, in
``checksums-rank<N>.json`` as the last file it writes, and rank 0 also records the world size.
A checkpoint verifies when every rank's manifest is there and every file it lists has its size
and digest, and no file the resume would read is missing from the manifests: a truncated upload,
a bit flip, a shard that never arrived or a file added afterwards all fail.

A resume (:func:`restore_first_good`) takes the newest checkpoint that verifies, with one line
saying which newer ones it skipped and why; a run none of whose checkpoints verifies stops with
one line. A planted file whose manifest was rewritten to match still verifies: the weights-only
loading (:mod:`.safe_loading`) refuses what it holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from itertools import chain
from pathlib import Path
from typing import Protocol

from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_PREFIX = "checksums-rank"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (read in blocks; not via the model-file module, which imports
    timm, because the driver imports this module too)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def write_manifest(directory: Path, rank: int, world_size: int) -> Path:
    """Record every file under ``directory`` (this rank's part of a checkpoint, written
    completely) with its size and SHA-256; written last, under a temporary name first."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if not relative.startswith(MANIFEST_PREFIX):
            files[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    record = {"rank": rank, "world_size": world_size, "files": files}
    target = directory / manifest_name(rank)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(target)
    return target


def _read_manifest(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is unreadable ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise ValueError(f"{path.name} is not a checksum manifest")
    return record


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in ``directory`` cannot be trusted, or None when it verifies."""
    try:
        zero = _read_manifest(directory / manifest_name(0)) if (
            directory / manifest_name(0)).is_file() else None
        if zero is None:
            return f"no {manifest_name(0)} (not written completely, or before checksums)"
        listed: dict[str, dict] = {}
        for rank in range(int(zero.get("world_size", 1))):
            path = directory / manifest_name(rank)
            if not path.is_file():
                return f"{path.name} is missing (rank {rank}'s part never arrived)"
            listed.update(_read_manifest(path)["files"])
    except ValueError as exc:
        return str(exc)
    for relative, entry in sorted(listed.items()):
        path = directory / relative
        if not path.is_file():
            return f"{relative} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{relative} is {size} bytes, {entry.get('size')} when written"
        if file_sha256(path) != entry.get("sha256"):
            return f"{relative} does not match its recorded SHA-256"
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        # Ray's own bookkeeping files start with a dot.
        if not (relative in listed or relative.startswith((MANIFEST_PREFIX, "."))):
            return f"{relative} is in no manifest"
    return None


class CheckpointSource(Protocol):
    """A checkpoint to restore from (``ray.train.Checkpoint`` is one)."""

    @property
    def path(self) -> str: ...

    def as_directory(self) -> AbstractContextManager[str]: ...


def restore_first_good(latest: CheckpointSource,
                       earlier: Callable[[], Iterable[CheckpointSource]],
                       load: Callable[[Path], None],
                       say: Callable[[str], None] = log.warning) -> CheckpointSource:
    """Restore (``load``) the newest checkpoint that verifies: ``latest``, else the first of
    ``earlier()`` (newest first; only listed when ``latest`` fails).

    Args:
        latest: the checkpoint Ray hands the workers.
        earlier: the run's older checkpoints, newest first.
        load: restores a verified checkpoint folder (``WorkerLoop.load``).
        say: gets one line when newer checkpoints were skipped (which, and why).

    Returns:
        The checkpoint restored.

    Raises:
        UserError: no checkpoint verifies (one line naming the newest and its problem).
    """
    skipped: list[str] = []
    candidates: Iterator[CheckpointSource] = chain([latest], _lazily(earlier))
    for source in candidates:
        with source.as_directory() as folder:
            problem = checkpoint_problem(Path(folder))
            if problem is None:
                if skipped:
                    say(f"resuming from the earlier checkpoint {source.path}: skipped "
                        + "; ".join(skipped))
                load(Path(folder))
                return source
        skipped.append(f"{source.path} ({problem})")
    raise UserError(f"no checkpoint of this run passes its checksums: {skipped[0]}"
                    + (f" and {len(skipped) - 1} earlier" if len(skipped) > 1 else ""))


def _lazily(earlier: Callable[[], Iterable[CheckpointSource]]) -> Iterator[CheckpointSource]:
    yield from earlier()


def manifest_world_size(directory: Path) -> int:
    """The number of ranks that wrote the checkpoint in ``directory`` (rank 0's manifest; a
    checkpoint :func:`checkpoint_problem` passed has one)."""
    return int(_read_manifest(directory / manifest_name(0)).get("world_size", 1))
