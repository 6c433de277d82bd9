"""Data and evaluation-state integrity: full-file checksums in the .beton provenance, the loader
watchdog, chunk records validated against their chunk, and the state folder's lease (local disk
and an S3 store)."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import pytest

from raytrain_at.data.provenance import (beton_sha256, file_sha256, provenance_path,
                                         read_provenance, require_provenance, verify_beton)
from raytrain_at.data.watchdog import watched_batches
from raytrain_at.data.write import write_dataset
from raytrain_at.errors import UserError
from raytrain_at.evaluation.autoattack import ChunkRecord
from raytrain_at.evaluation.lease import StateLease
from raytrain_at.evaluation.runner import (EvalJob, merge, pending_units, read_unit,
                                           record_problem, write_record)
from raytrain_at.evaluation.threats import ThreatModel
from raytrain_at.runtime.storage import read_versioned
from tests.s3_store import object_store


@pytest.fixture(scope="module")
def val_beton(tmp_path_factory) -> Path:
    """The bundled digits' validation split as a .beton (8 MiB of pages: data past 1 MiB)."""
    folder = tmp_path_factory.mktemp("integrity")
    return write_dataset("digits", folder / "digits_val.beton", split="val")


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    provenance_path(dst).write_text(provenance_path(src).read_text())
    return dst


def test_provenance_records_the_whole_files_checksum(val_beton):
    record = read_provenance(val_beton)
    assert record is not None and record["split"] == "val"
    assert record["sha256"] == file_sha256(val_beton)
    assert record["size"] == val_beton.stat().st_size > 2 << 20
    assert verify_beton(val_beton, "data.heldout") == record["sha256"]


def test_a_flip_past_the_first_mib_is_refused_naming_the_file(val_beton, tmp_path):
    copy = _copy(val_beton, tmp_path / "digits_val.beton")  # a staged copy: another mtime
    assert verify_beton(copy, "--data") == read_provenance(val_beton)["sha256"]
    assert (tmp_path / ".digits_val.beton.verified").is_file()  # the next start is cheap
    _flip(copy, copy.stat().st_size - 100)
    with pytest.raises(UserError) as info:
        verify_beton(copy, "--data")
    message = str(info.value)
    assert "\n" not in message and str(copy) in message and "sha256" in message


def test_the_cheap_check_trusts_only_an_unchanged_size_and_mtime(val_beton, tmp_path):
    """Same size and mtime as recorded: trusted without hashing (what a bypassed check looks
    like: the loader watchdog is the guard left); any other mtime is hashed in full."""
    copy = _copy(val_beton, tmp_path / "digits_val.beton")
    _flip(copy, 5 << 20)
    recorded = read_provenance(copy)
    os.utime(copy, ns=(recorded["mtime_ns"], recorded["mtime_ns"]))
    assert verify_beton(copy, "--data") == recorded["sha256"]  # not hashed: trusted
    os.utime(copy, ns=(recorded["mtime_ns"] + 1, recorded["mtime_ns"] + 1))
    with pytest.raises(UserError, match="does not match"):
        verify_beton(copy, "--data")


def test_a_file_without_provenance_is_hashed_and_refused_as_heldout(val_beton, tmp_path):
    bare = tmp_path / "bare.beton"
    bare.write_bytes(val_beton.read_bytes())
    assert verify_beton(bare, "data.train") is None
    assert beton_sha256(bare) == file_sha256(val_beton)
    with pytest.raises(UserError) as info:
        require_provenance(bare, "data.heldout")
    assert str(info.value).startswith("data.heldout ") and "bare.beton.json" in str(info.value)


class _Epoch:
    """The two things the watchdog reads of FFCV's EpochIterator: its queue and its thread."""

    def __init__(self, produce) -> None:
        self.output_queue: queue.Queue = queue.Queue(2)
        self.closed = False
        self.thread = threading.Thread(target=produce, args=(self.output_queue,), daemon=True)
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self.closed = True


def test_watchdog_passes_batches_and_stops_a_stuck_or_dead_producer(tmp_path):
    def two_batches(out: queue.Queue) -> None:
        out.put((0, "a"))
        out.put((1, "b"))
        out.put(None)

    assert list(watched_batches(_Epoch(two_batches), 5.0, tmp_path / "ok.beton")) == ["a", "b"]
    stop = threading.Event()
    stuck = _Epoch(lambda out: (out.put((0, "a")), stop.wait(30)))
    start = time.monotonic()
    batches = watched_batches(stuck, 1.5, tmp_path / "stuck.beton")
    assert next(batches) == "a"
    with pytest.raises(UserError, match="no batch within 1.5 s") as info:
        next(batches)
    assert 1.4 < time.monotonic() - start < 5 and stuck.closed
    assert "stuck.beton" in str(info.value) and "\n" not in str(info.value)
    stop.set()

    def dies(out: queue.Queue) -> None:
        raise RuntimeError("decoder crashed")

    threading.excepthook, saved = (lambda args: None), threading.excepthook
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match="stopped before the end of the epoch"):
            list(watched_batches(_Epoch(dies), 60.0, tmp_path / "dead.beton"))
        assert time.monotonic() - start < 5  # at once, not after the 60 s limit
    finally:
        threading.excepthook = saved


def _job(root: str, data: Path) -> EvalJob:
    return EvalJob(model_ref="m", weights_sha256="0" * 64, data_path=str(data),
                   ids=tuple(range(6)), resolution=16, crop_pct=1.0,
                   threats=(ThreatModel("linf", 4 / 255),), version="fast", seed=0,
                   batch_size=3, num_classes=10, state_root=root)


def _complete(job: EvalJob, chunk: int) -> ChunkRecord:
    threat = job.threats[0]
    return ChunkRecord(ids=list(job.chunks()[chunk]), status=["robust", "apgd-ce", "robust"],
                       attacks_done=["apgd-ce", "apgd-t"], complete=True,
                       max_perturbation=threat.eps, norm=threat.norm, eps=threat.eps)


def test_records_that_do_not_fit_their_chunk_are_attacked_again(val_beton, tmp_path):
    job = _job(str(tmp_path), val_beton)
    threat = job.threats[0]
    good = _complete(job, 0)
    assert record_problem(good, job.chunks()[0], threat, "fast") is None
    wrong = {
        "ids": ChunkRecord(**{**good.as_dict(), "ids": [3, 4, 5]}),
        "length": ChunkRecord(**{**good.as_dict(), "status": ["robust", "robust"]}),
        "norm": ChunkRecord(**{**good.as_dict(), "norm": "l2"}),
        "eps": ChunkRecord(**{**good.as_dict(), "eps": 8 / 255}),
        "status": ChunkRecord(**{**good.as_dict(), "status": ["robust", "fab-t", "robust"]}),
        "complete": ChunkRecord(**{**good.as_dict(), "attacks_done": ["apgd-ce"]}),
    }
    for name, record in wrong.items():
        assert record_problem(record, job.chunks()[0], threat, "fast"), name
    write_record(job.record_path(threat, 1), _complete(job, 1))
    assert read_unit(job, threat, 1) == _complete(job, 1)
    for planted in ("", "{}", json.dumps(wrong["length"].as_dict()), "[1, 2]", "\xff"):
        Path(job.record_path(threat, 0)).write_text(planted)
        assert read_unit(job, threat, 0) is None, planted
        assert pending_units(job) == [(0, threat.key)]
        with pytest.raises(UserError, match="chunk-00000.json is unfinished or does not fit"):
            merge(job)  # never merged
    write_record(job.record_path(threat, 0), good)
    assert pending_units(job) == [] and merge(job)[threat].robust_accuracy == pytest.approx(4 / 6)


def test_records_are_renamed_into_place_after_an_fsync(val_beton, tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    job = _job(str(tmp_path), val_beton)
    path = Path(job.record_path(job.threats[0], 0))
    write_record(str(path), _complete(job, 0))
    assert synced[-1] == str(path.parent)  # the folder, after the rename
    assert any(s.startswith(str(path.parent / ".chunk-00000.json.")) for s in synced[:-1])
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _lease_cycle(state_dir: str) -> None:
    """Holder A takes the lease; B is refused in one line; A's expired lease is taken over by
    C, after which A notices it lost it; release removes only the holder's own lease."""
    a = StateLease(state_dir, ttl_s=60, owner="driver-a")
    a.acquire()
    with pytest.raises(UserError) as info:
        StateLease(state_dir, owner="driver-b").acquire()
    assert "in use by another driver (driver-a" in str(info.value)
    assert "\n" not in str(info.value)
    a.renew()
    a.check()
    a.release()
    assert read_versioned(f"{state_dir}/lease.json") is None
    short = StateLease(state_dir, ttl_s=0.5, owner="driver-a")
    short.acquire()
    time.sleep(0.7)
    c = StateLease(state_dir, ttl_s=60, owner="driver-c")
    c.acquire()  # took over the expired one
    short.renew()
    with pytest.raises(UserError, match="taken by another driver"):
        short.check()
    short.release()  # not its lease any more: left alone
    held = read_versioned(f"{state_dir}/lease.json")
    assert held is not None and json.loads(held[0])["owner"] == "driver-c"
    c.release()
    assert read_versioned(f"{state_dir}/lease.json") is None


def test_lease_on_a_local_folder(tmp_path):
    _lease_cycle(str(tmp_path / "state"))


def test_lease_on_an_s3_store_uses_conditional_puts():
    with object_store(bucket="lease-bucket"):
        _lease_cycle("s3://lease-bucket/eval-state/abc")
        # Two takers of one absent lease at once: exactly one wins.
        results: list[str] = []

        def take(owner: str) -> None:
            try:
                StateLease("s3://lease-bucket/eval-state/race", owner=owner).acquire()
                results.append(owner)
            except UserError:
                pass

        threads = [threading.Thread(target=take, args=(f"d{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 1
