#!/usr/bin/env python3
"""The MLflow store's dumps (pg_dump archives) in S3 or a local folder, for backup_mlflow.sh
(which writes them) and start_mlflow.sh (which restores the latest into an empty database).

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
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlflow-marker-{os.getpid()}"
        marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        try:
            store.write(marker, MARKER)
        finally:
            marker.unlink(missing_ok=True)
        return 0
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
