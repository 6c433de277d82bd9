"""Where a .beton came from, and whether it is still the file that was written.

``raytrain-at data write-ffcv`` writes ``NAME.beton.json`` beside every file: its source, split and
subset (the test-split guard reads these), and the sha256 of the whole file with the size and
mtime it had when written. A run start (training's data check, ``evaluate``) compares the file with
that checksum and stops with one line naming the file when they differ, so a file damaged on disk
or in transit (``scripts/cluster/stage_data.sh`` copies the ``.json`` with every ``.beton``) never
reaches training or an evaluation.

Hashing a whole ImageNet file takes minutes, so the check is skipped only where it can be trusted
to add nothing: the file still has the size and mtime recorded beside it (the file as written on
this machine), or a previous full check on this node left a note (``.NAME.beton.verified``) with
the size and mtime it saw. Anything else (a staged copy with its own mtime, a changed file, no
note) is hashed in full.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from raytrain_at.errors import UserError

log = logging.getLogger(__name__)

_BLOCK = 8 << 20  # streamed in 8 MiB reads: constant memory for a 350 GB file


def provenance_path(beton: str | Path) -> Path:
    """``NAME.beton.json`` beside a written file: where it came from (source, split, subset)."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".json")


def _verified_note(beton: Path) -> Path:
    return beton.with_name(f".{beton.name}.verified")


def file_sha256(path: str | Path) -> str:
    """The sha256 of the whole file, streamed."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_json(target: Path, record: dict) -> None:
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(target)


def write_provenance(beton: Path, record: dict) -> None:
    """Write ``NAME.beton.json``: ``record`` plus the file's sha256, size and mtime."""
    _write_json(provenance_path(beton), {**record, "sha256": file_sha256(beton), **_stamp(beton)})


def read_provenance(beton: str | Path) -> dict | None:
    """The provenance record of a .beton file, or None (written elsewhere or before it existed)."""
    try:
        record = json.loads(provenance_path(beton).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_test_data(beton: str | Path) -> bool:
    """Whether a .beton was written from a test split (or ImageNet's RobustBench 5k subset)."""
    record = read_provenance(beton) or {}
    return record.get("split") == "test" or record.get("subset") == "robustbench5k"


def _trusted_digest(path: Path, record: dict) -> str | None:
    """The recorded checksum when the file is provably the one it was computed on (same size
    and mtime as at write time, or as at this node's last full check); else None."""
    stamp = _stamp(path)
    if {k: record.get(k) for k in stamp} == stamp:
        return record["sha256"]
    try:
        note = json.loads(_verified_note(path).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(note, dict) and note.get("sha256") == record["sha256"] \
            and {k: note.get(k) for k in stamp} == stamp:
        return record["sha256"]
    return None


def _leave_note(path: Path, digest: str) -> None:
    """Remember a full check on this node (best effort: a read-only folder just hashes again)."""
    try:
        _write_json(_verified_note(path), {"sha256": digest, **_stamp(path)})
    except OSError:
        pass


def verify_beton(path: str | Path, key: str) -> str | None:
    """Compare ``path`` with the checksum in its provenance.

    Args:
        path: the .beton file.
        key: what names it in an error (``data.train``, ``--data``).

    Returns:
        The file's sha256, or None when it has no provenance or the provenance records no
        checksum (written before checksums were recorded).

    Raises:
        UserError: the file's content differs from the recorded checksum.
    """
    path = Path(path)
    record = read_provenance(path)
    if record is None or not isinstance(record.get("sha256"), str):
        return None
    trusted = _trusted_digest(path, record)
    if trusted is not None:
        return trusted
    log.info("checking %s against its recorded sha256", path)
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise UserError(f"{key} {str(path)!r} does not match the sha256 in "
                        f"{provenance_path(path).name} ({digest[:12]} != {record['sha256'][:12]}): "
                        "the file changed or was damaged in transit; write or stage it again")
    _leave_note(path, digest)
    return digest


def beton_sha256(path: str | Path) -> str:
    """The file's full sha256: checked against its provenance when it has one, else hashed."""
    return verify_beton(path, "dataset file") or file_sha256(path)


def require_provenance(path: str | Path, key: str) -> dict:
    """The provenance of a file whose origin must be known (held-out data: it must not be carved
    from a test split, which only the provenance tells).

    Raises:
        UserError: naming ``key`` when the file has no ``NAME.beton.json``.
    """
    record = read_provenance(path)
    if record is None:
        raise UserError(f"{key} {str(path)!r} has no provenance ({provenance_path(path).name}): "
                        "its split cannot be checked; write it with `raytrain-at data write-ffcv` "
                        "and stage the .beton.json with it")
    return record
