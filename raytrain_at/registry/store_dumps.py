"""The MLflow store's dumps (pg_dump archives) in S3 or a local folder, for
scripts/cluster/backup_mlflow.sh (which writes them) and start_mlflow.sh (which restores the
latest into an empty database): ``python -m raytrain_at.registry.store_dumps COMMAND ...``.

Layout under the store (s3://BUCKET/PREFIX or a folder):
    mlflow-YYYYMMDDTHHMMSSZ.dump          the archive, under a new key every time
    mlflow-YYYYMMDDTHHMMSSZ.dump.sha256   its SHA-256, uploaded after it: a dump without one
                                          is an upload that did not finish and never counts
    INITIALISED                           written at the first start on an empty store: from
                                          then on a start that finds no dump refuses

Commands (exit 0 done, 3 nothing there, 1 error with one line on stderr):
    latest STORE              print the newest complete dump's name
    get STORE NAME DEST       download to DEST.partial, check its SHA-256, then rename to DEST
    put STORE FILE [--keep N] upload FILE as a new dump; then delete all but the newest N
    initialised STORE         exit 0 when INITIALISED exists, else 3
    mark STORE                write INITIALISED
    restore-if-empty STORE PG_URI --shown NAME --work DIR --log FILE
                              start_mlflow.sh's guard: an empty database gets the latest dump,
                              or the reason it must not start on stderr (exit 1)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "INITIALISED"
SUFFIX = ".dump"
DIGEST = ".sha256"


class Store:
    """A folder or an S3 prefix with the four operations the commands need."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.s3 = url.startswith("s3://")
        if self.s3:
            import boto3  # on the head only (head_setup_commands installs it)

            bucket, _, prefix = self.url[len("s3://"):].partition("/")
            self.bucket, self.prefix = bucket, f"{prefix}/" if prefix else ""
            # AWS_ENDPOINT_URL (an S3-compatible store such as the rehearsal's) is read by boto3.
            self.client = boto3.client("s3")
        else:
            self.folder = Path(url)

    def names(self) -> list[str]:
        if not self.s3:
            return sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
        names: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                        Prefix=self.prefix)
        for page in pages:
            names += [item["Key"][len(self.prefix):] for item in page.get("Contents", [])]
        return sorted(names)

    def read(self, name: str, destination: Path) -> None:
        if self.s3:
            self.client.download_file(self.bucket, self.prefix + name, str(destination))
        else:
            shutil.copyfile(self.folder / name, destination)

    def write(self, source: Path, name: str) -> None:
        if self.s3:
            self.client.upload_file(str(source), self.bucket, self.prefix + name)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.folder / f".{name}.partial"
            shutil.copyfile(source, partial)
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            partial.rename(self.folder / name)

    def delete(self, name: str) -> None:
        if self.s3:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
        else:
            (self.folder / name).unlink(missing_ok=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete_dumps(store: Store) -> list[str]:
    """Dump names with their digest beside them, oldest first (the names sort by time)."""
    names = set(store.names())
    return sorted(n for n in names if n.endswith(SUFFIX) and n + DIGEST in names)


def command_latest(store: Store) -> int:
    dumps = complete_dumps(store)
    if not dumps:
        return 3
    print(dumps[-1])
    return 0


def command_get(store: Store, name: str, destination: Path) -> int:
    partial = destination.with_name(destination.name + ".partial")
    digest_file = destination.with_name(destination.name + DIGEST)
    try:
        store.read(name + DIGEST, digest_file)
        expected = digest_file.read_text().split()[0].strip()
        store.read(name, partial)
        actual = sha256(partial)
        if actual != expected:
            raise SystemExit(f"{store.url}/{name}: SHA-256 {actual[:12]}... is not the recorded "
                             f"{expected[:12]}... (a partial or corrupted dump)")
        partial.rename(destination)
    finally:
        partial.unlink(missing_ok=True)
        digest_file.unlink(missing_ok=True)
    return 0


def command_put(store: Store, source: Path, keep: int) -> int:
    if source.stat().st_size == 0:
        raise SystemExit(f"{source}: an empty dump is never uploaded")
    name = time.strftime("mlflow-%Y%m%dT%H%M%SZ", time.gmtime()) + SUFFIX
    if name in store.names():
        raise SystemExit(f"{store.url}/{name} exists already: not overwriting it")
    digest = source.with_name(source.name + DIGEST)
    digest.write_text(f"{sha256(source)}  {name}\n")
    try:
        store.write(source, name)
        store.write(digest, name + DIGEST)  # last: it makes the dump count
    finally:
        digest.unlink(missing_ok=True)
    print(name)
    dumps = complete_dumps(store)
    for old in dumps[:max(0, len(dumps) - keep)]:
        store.delete(old + DIGEST)
        store.delete(old)
    return 0


def _refuse(reason: str) -> None:
    raise SystemExit(reason)


def _store_call(what: str, call):
    """``call()``, its failure turned into the refusal ``what``."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - boto3/OS errors: the refusal names the store
        raise SystemExit(what) from exc


def command_restore_if_empty(store: Store, pg_uri: str, shown: str, work: Path,
                             log: Path) -> int:
    """Restore the latest complete dump into an empty database, or refuse (see the docstring).

    A database that holds tables is left alone. One without: the newest complete dump is
    downloaded and checked, listed by pg_restore, then restored in one transaction (a restore
    failing half-way leaves the database empty, so the next start refuses again instead of
    serving a partial store). With no dump, the first start ever marks the store initialised;
    any later one refuses unless RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY=1.
    """
    counted = subprocess.run(
        ["psql", "-XtAq", "-d", pg_uri, "-c", "select count(*) from information_schema.tables "
         "where table_schema = current_schema()"], capture_output=True, text=True)
    if counted.returncode != 0:
        first = (counted.stderr or counted.stdout).strip().splitlines()
        _refuse(f"PostgreSQL {shown} does not answer: {first[0] if first else ''}")
    if int(counted.stdout.strip() or 0) != 0:
        return 0
    dumps = _store_call(f"cannot list the dumps in {store.url}", lambda: complete_dumps(store))
    if not dumps:
        marked = _store_call(f"cannot read {store.url}", lambda: MARKER in store.names())
        if marked and os.environ.get("RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY", "0") != "1":
            _refuse(f"{shown} is empty and {store.url} has no dump, though the store was "
                    "initialised (restore one by hand, or set RAYTRAIN_AT_MLFLOW_ALLOW_EMPTY=1 "
                    "to start empty)")
        with open(log, "a") as handle:
            handle.write(f"[mlflow] {shown} is empty and has no dump yet: a new store\n")
        _store_call(f"cannot write the marker to {store.url}", lambda: command_mark(store))
        return 0
    latest = dumps[-1]
    folder = Path(tempfile.mkdtemp(prefix="restore.", dir=work))
    try:
        dump = folder / "mlflow.dump"
        try:
            command_get(store, latest, dump)
        except SystemExit as exc:
            _refuse(f"downloading {store.url}/{latest} failed ({exc.code}): {shown} stays empty")
        except Exception as exc:  # noqa: BLE001 - boto3/OS errors, in the one line
            _refuse(f"downloading {store.url}/{latest} failed ({type(exc).__name__}): "
                    f"{shown} stays empty")
        listed = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True)
        if listed.returncode != 0:
            _refuse(f"{store.url}/{latest} is not a pg_dump archive: {shown} stays empty")
        with open(log, "a") as handle:
            restored = subprocess.run(
                ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error",
                 "--single-transaction", "-d", pg_uri, str(dump)], stdout=handle, stderr=handle)
        if restored.returncode != 0:
            _refuse(f"restoring {store.url}/{latest} into {shown} failed (see {log}): "
                    "it stays empty")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"[mlflow] restored {shown} from {store.url}/{latest}")
    return 0


def command_mark(store: Store) -> int:
    """Write the INITIALISED marker."""
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlflow-marker-{os.getpid()}"
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    try:
        store.write(marker, MARKER)
    finally:
        marker.unlink(missing_ok=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("latest").add_argument("store")
    get = sub.add_parser("get")
    get.add_argument("store")
    get.add_argument("name")
    get.add_argument("destination", type=Path)
    put = sub.add_parser("put")
    put.add_argument("store")
    put.add_argument("file", type=Path)
    put.add_argument("--keep", type=int, default=24)
    sub.add_parser("initialised").add_argument("store")
    sub.add_parser("mark").add_argument("store")
    restore = sub.add_parser("restore-if-empty")
    restore.add_argument("store")
    restore.add_argument("pg_uri")
    restore.add_argument("--shown", required=True)
    restore.add_argument("--work", type=Path, required=True)
    restore.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    store = Store(args.store)
    try:
        if args.command == "latest":
            return command_latest(store)
        if args.command == "get":
            return command_get(store, args.name, args.destination)
        if args.command == "put":
            return command_put(store, args.file, max(1, args.keep))
        if args.command == "initialised":
            return 0 if MARKER in store.names() else 3
        if args.command == "restore-if-empty":
            return command_restore_if_empty(store, args.pg_uri, args.shown, args.work, args.log)
        return command_mark(store)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"[mlflow-backups] {exc.code}", file=sys.stderr)
            return 1
        raise
    except Exception as exc:  # noqa: BLE001 - boto3/OS errors: one line for the shell script
        print(f"[mlflow-backups] {args.store}: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
