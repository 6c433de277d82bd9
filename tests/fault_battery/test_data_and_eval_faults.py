"""Fault battery: data and evaluation state (issue 29, point 6).

Two ``evaluate`` drivers on one S3 state folder, planted bad chunk records, a .beton bit-flipped
past its first MiB (refused by its checksum; with that check bypassed, stopped by the loader
watchdog: not yet a battery case, see tests/test_data_integrity.py), and a staged held-out file without provenance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raytrain_at.data.ffcv_writer import WriteOptions
from raytrain_at.data.provenance import provenance_path, read_provenance
from raytrain_at.data.write import write_dataset
from raytrain_at.errors import UserError
from raytrain_at.evaluation.evaluate import evaluate, evaluation_request
from raytrain_at.evaluation.lease import StateLease
from raytrain_at.evaluation.result import read_result
from raytrain_at.evaluation.runner import read_record
from tests.s3_store import object_store

ROOT = Path(__file__).resolve().parents[2]
# Small, so every driver finishes in seconds on 2 cores: 24 digits, 3 chunks, APGD-T only.
EVAL = ["--norms", "linf", "--version", "apgdt", "--n", "24", "--batch-size", "8", "--seed", "1"]


def _cli(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raytrain_at.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _s3_keys(prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket, _, key = prefix.partition("/")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _records_fit(keys: list[str], bucket: str) -> None:
    """Every chunk record under the state folder is complete and fits its chunk (8 images)."""
    chunks = [k for k in keys if k.rsplit("/", 1)[-1].startswith("chunk-")]
    assert len(chunks) == 3, keys
    for key in chunks:
        record = read_record(f"s3://{bucket}/{key}")
        assert record is not None and record.complete and len(record.status) == 8, key
        assert record.norm == "linf" and len(record.ids) == 8


def test_two_evaluate_drivers_on_one_s3_state_folder(robust_model_file, eval_home, tmp_path):
    """Two `evaluate` drivers on one state folder (moto S3): equal results or a one-line refusal, never a corrupted record."""
    with object_store(bucket="battery-bucket"):
        state = "s3://battery-bucket/eval-state"
        outs = [tmp_path / "a.json", tmp_path / "b.json"]
        a = _cli(["evaluate", robust_model_file, "--data", "digits", *EVAL, "--state-dir", state,
                  "--out", str(outs[0])])
        deadline = time.monotonic() + 90
        while not any(k.endswith("lease.json") for k in _s3_keys("battery-bucket/eval-state")):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.2)
        b = _cli(["evaluate", robust_model_file, "--data", "digits", *EVAL, "--state-dir", state,
                  "--out", str(outs[1])])
        answers = [p.communicate(timeout=150) for p in (a, b)]
        assert a.returncode == 0, answers[0][1][-2000:]
        first = read_result(outs[0]).threats["linf"]
        if b.returncode == 0:
            assert read_result(outs[1]).threats["linf"].status == first.status
        else:
            lines = answers[1][1].strip().splitlines()
            assert len(lines) == 1 and "in use by another driver" in lines[0], lines
            assert not outs[1].exists()
        keys = _s3_keys("battery-bucket/eval-state")
        _records_fit(keys, "battery-bucket")
        assert not any(k.endswith("lease.json") for k in keys)  # released by its holder
        # A driver holding the lease (this test) makes the next one refuse, deterministically;
        # once released, the same command reuses every record and gives the same result.
        state_dir = f"s3://battery-bucket/{keys[0].split('/')[0]}/{keys[0].split('/')[1]}"
        with StateLease(state_dir, owner="battery-holder"):
            c = _cli(["evaluate", robust_model_file, "--data", "digits", *EVAL, "--state-dir",
                      state, "--out", str(tmp_path / "c.json")])
            _, err = c.communicate(timeout=150)
        assert c.returncode != 0 and not (tmp_path / "c.json").exists()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "battery-holder" in lines[0], lines
        d = _cli(["evaluate", robust_model_file, "--data", "digits", *EVAL, "--state-dir", state,
                  "--out", str(tmp_path / "d.json")])
        assert d.wait(timeout=150) == 0
        assert read_result(tmp_path / "d.json").threats["linf"].status == first.status
        _records_fit(_s3_keys("battery-bucket/eval-state"), "battery-bucket")


def test_planted_bad_records_are_attacked_again(robust_model_file, eval_home, tmp_path):
    """Chunk records "", "{}" and one with a wrong-length status planted: attacked again to the same result; never merged or a crash."""
    state = tmp_path / "state"
    values = dict(model_ref=robust_model_file, data="digits", norms=["linf"], version="apgdt",
                  n=24, batch_size=8, seed=1, state_root=str(state))
    first, _ = evaluate(evaluation_request(**values, out=str(tmp_path / "first.json")))
    records = sorted(state.rglob("chunk-*.json"))
    assert len(records) == 3
    wrong_length = json.loads(records[2].read_text())
    wrong_length["status"] = wrong_length["status"][:5]
    for path, planted in zip(records, ("", "{}", json.dumps(wrong_length))):
        path.write_text(planted)
    again, _ = evaluate(evaluation_request(**values, out=str(tmp_path / "again.json")))
    assert again.threats["linf"].status == first.threats["linf"].status
    for path in records:  # rewritten whole
        record = json.loads(path.read_text())
        assert record["complete"] and len(record["status"]) == 8 and record["norm"] == "linf"


@pytest.fixture(scope="module")
def flipped_beton(tmp_path_factory) -> tuple[Path, int]:
    """The digits' training split as JPEGs (25 MB), with one bit of sample 700's size in the
    allocation table (near the end of the file, far past the first MiB) flipped, a damage the
    old first-MiB fingerprint could not see. Returns the file and its recorded mtime."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    folder = tmp_path_factory.mktemp("flipped")
    path = write_dataset("digits", folder / "digits_jpg.beton", split="train",
                         options=WriteOptions(max_resolution=None, write_mode="jpg"))
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    table = Reader(str(path)).alloc_table
    offset = int(header["alloc_table_ptr"]) + 700 * table.dtype.itemsize + 16 + 2
    assert offset > 1 << 20
    recorded = read_provenance(path)
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    return path, recorded["mtime_ns"]


def test_bit_flip_past_the_first_mib_is_refused_at_start(flipped_beton, robust_model_file,
                                                          eval_home, tmp_path):
    """A .beton bit-flipped past 1 MiB: refused at start by its full-file checksum, one line naming the file, nothing written."""
    path, _ = flipped_beton
    out = tmp_path / "never.json"
    run = _cli(["evaluate", robust_model_file, "--data", str(path), *EVAL[:-4], "--n", "720",
                "--out", str(out), "--state-dir", str(tmp_path / "state")])
    _, err = run.communicate(timeout=150)
    lines = err.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1, lines
    assert str(path) in lines[0] and "sha256" in lines[0]
    assert not out.exists() and not (tmp_path / "state").exists()


def test_staged_heldout_without_provenance_is_refused(tmp_path):
    """A held-out .beton staged without its NAME.beton.json: refused as data.heldout; staged with it, accepted."""
    from raytrain_at.config import load_config
    from raytrain_at.training.launch import prepare_run

    source = tmp_path / "bucket"
    source.mkdir()
    write_dataset("digits", source / "digits_val.beton", split="val")
    shutil.copyfile(source / "digits_val.beton", source / "carved_val.beton")  # no .json
    env = {**os.environ, "RAYTRAIN_AT_ENV_FILE": str(tmp_path / "no.env"),
           "RAYTRAIN_AT_BETON_SOURCE": str(source), "RAYTRAIN_AT_STAGE_ROOT": str(tmp_path),
           "RAYTRAIN_AT_DATA": str(tmp_path / "data")}
    staged = subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "stage_data.sh")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert staged.returncode == 0, staged.stderr
    assert "carved_val.beton has no carved_val.beton.json" in staged.stderr
    data = tmp_path / "data"
    assert provenance_path(data / "digits_val.beton").is_file()
    assert not provenance_path(data / "carved_val.beton").exists()
    with pytest.raises(UserError) as info:
        prepare_run(load_config("quickstart", [f"data.heldout={data / 'carved_val.beton'}"]),
                    storage_path=str(tmp_path / "home"))
    assert str(info.value).startswith("data.heldout ") and "no provenance" in str(info.value)
    prepare_run(load_config("quickstart", [f"data.heldout={data / 'digits_val.beton'}"]),
                storage_path=str(tmp_path / "home"))
