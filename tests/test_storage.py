"""One storage root for a cluster: precedence, the multi-node refusal, S3 errors, chunk records
on an S3 store, a state key every node agrees on, and the resources an evaluation shard asks."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from raytrain_at.errors import UserError
from raytrain_at.evaluation.autoattack import ChunkRecord
from raytrain_at.evaluation.runner import (EvalJob, finished_images, merge, pending_chunks,
                                           read_record, shard_resources, state_key,
                                           write_record)
from raytrain_at.evaluation.threats import ThreatModel
from raytrain_at.runtime.ports import free_local_port
from raytrain_at.runtime.storage import (STORAGE_ENV, check_root, explicit_root,
                                         require_shared_root, storage_root)
from tests.s3_store import object_store


def test_root_precedence_option_config_env_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert explicit_root(None, None) is None
    assert storage_root(None, None) == str(tmp_path / "home")
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/env/")
    assert storage_root(None, None) == "s3://bucket/env"
    assert storage_root(None, "s3://bucket/config") == "s3://bucket/config"
    assert storage_root("rel", "s3://bucket/config") == str(Path("rel").absolute())


def test_multi_node_run_without_a_root_stops_naming_the_setting():
    with pytest.raises(UserError) as info:
        require_shared_root(None, "evaluation", nodes=3)
    assert STORAGE_ENV in str(info.value) and "3-node" in str(info.value)
    require_shared_root(None, "evaluation", nodes=1)  # one machine: the home is fine
    require_shared_root("s3://bucket/x", "evaluation", nodes=3)


def test_a_local_root_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="a-file is not a folder") as info:
        check_root(str(tmp_path / "a-file" / "runs" / "deeper"))
    assert "\n" not in str(info.value)
    check_root(str(tmp_path / "new" / "runs"))  # creatable: fine, and nothing is made yet
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def store():
    with object_store(bucket="rehearsal-bucket") as endpoint:
        yield endpoint


def test_missing_bucket_and_dead_store_are_one_line(store, monkeypatch):
    check_root("s3://rehearsal-bucket/runs")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        check_root("s3://no-such-bucket/runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_local_port()}")
    with pytest.raises(UserError, match="does not answer") as info:
        check_root("s3://rehearsal-bucket/runs")
    assert "\n" not in str(info.value)


def _job(data: str, root: str) -> EvalJob:
    return EvalJob(model_ref="m", weights_sha256="0" * 64, data_path=data, ids=tuple(range(6)),
                   resolution=16, crop_pct=1.0, threats=(ThreatModel("linf", 4 / 255),),
                   version="fast", seed=0, batch_size=3, num_classes=10, state_root=root)


def test_chunk_records_live_on_the_object_store(store, eval_home):
    data = str(Path(eval_home) / "datasets" / "digits_test.beton")
    job = _job(data, "s3://rehearsal-bucket/eval-state")
    assert job.state_dir.startswith("s3://rehearsal-bucket/eval-state/")
    assert pending_chunks(job) == [0, 1]
    threat = job.threats[0]
    for chunk, status in enumerate((["robust", "misclassified", "apgd-ce"],
                                    ["robust", "robust", "apgd-t"])):
        record = ChunkRecord(ids=list(job.chunks()[chunk]), status=status,
                             attacks_done=["apgd-ce", "apgd-t"], complete=True,
                             max_perturbation=4 / 255, norm=threat.norm, eps=threat.eps)
        write_record(job.record_path(threat, chunk), record)
    assert read_record(job.record_path(threat, 1)).status == ["robust", "robust", "apgd-t"]
    assert pending_chunks(job) == [] and finished_images(job) == 6
    # A worker on another node sees the same records: a job rebuilt from its dict.
    again = EvalJob.from_dict(job.to_dict())
    assert merge(again)[threat].robust_accuracy == pytest.approx(3 / 6)


def test_state_key_is_the_same_wherever_the_data_lies(eval_home, tmp_path):
    """The driver's resolved path, a staged copy and a link (another node's view of the same
    file) give one key; other content gives another."""
    data = Path(eval_home) / "datasets" / "digits_test.beton"
    copy = tmp_path / "nvme" / data.name
    copy.parent.mkdir()
    shutil.copyfile(data, copy)
    os.utime(copy, (1, 1))
    link = tmp_path / "link"
    link.mkdir()
    (link / data.name).symlink_to(copy)
    keys = {_job(str(p), str(tmp_path)).state_key for p in (data, copy, link / data.name)}
    assert len(keys) == 1
    with copy.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 8)
    assert _job(str(copy), str(tmp_path)).state_key not in keys
    assert state_key(weights_sha256="1" * 64, data_path=str(data), ids=tuple(range(6)),
                     resolution=16, crop_pct=1.0, version="fast", seed=0,
                     batch_size=3) not in keys


def test_shards_ask_a_gpu_each_on_gpus_and_share_the_cpus_otherwise():
    # Whether they run on GPUs: tests/test_eval_device_choice.py.
    gpu_cluster = {"CPU": 64.0, "GPU": 16.0}
    assert shard_resources(True, 4, gpu_cluster) == (1, 1)
    assert shard_resources(False, 4, {"CPU": 8.0}) == (2, 0)
    assert shard_resources(False, 4, gpu_cluster) == (16, 0)
    assert shard_resources(True, 2, {"CPU": 2.0}) == (1, 1)
    assert shard_resources(False, 4, {"CPU": 0.0}) == (1, 0)  # a head advertising no CPU


@pytest.mark.parametrize("state_dir, culprit", [
    ("s3://no-such-bucket/eval-state", "no-such-bucket"),
])
def test_evaluate_with_a_missing_bucket_writes_nothing(state_dir, culprit, store,
                                                      robust_model_file, eval_home, tmp_path,
                                                      monkeypatch, capsys):
    from raytrain_at.cli import main

    out = tmp_path / "never.json"
    monkeypatch.setattr(sys, "argv", ["raytrain-at", "evaluate", robust_model_file, "--data",
                                      "digits", "--state-dir", state_dir, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], lines
    assert not out.exists()


def test_tracking_server_down_is_one_line():
    from raytrain_at.tracking.experiments import check_tracking_server
    uri = f"http://127.0.0.1:{free_local_port()}"
    with pytest.raises(UserError, match="does not answer") as info:
        check_tracking_server(uri, timeout_s=2)
    assert uri in str(info.value) and "\n" not in str(info.value)
    check_tracking_server("sqlite:///never-opened.db")  # no server to ask


def test_run_name_reference_names_the_latest_finished_run_of_that_name_by_this_user(tmp_path):
    """``run:EXPERIMENT/RUN_NAME``: how an AT recipe names its clean pre-training. Only a
    FINISHED run of this tool (its run-name tag) by this user counts: planted near misses
    (RUNNING, another creator, the name without the tool's tag) are never the answer."""
    from mlflow.tracking import MlflowClient

    from raytrain_at.model_refs import run_name_reference
    from raytrain_at.tracking.creator import MLFLOW_USER, run_creator
    from raytrain_at.tracking.runs import RUN_NAME_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("clean-pretraining",
                                          artifact_location=str(tmp_path / "artifacts"))
    name = "clean_convnext_tiny_cvst"
    ours = {RUN_NAME_TAG: name, MLFLOW_USER: run_creator()}
    run = client.create_run(experiment, tags=ours)
    client.set_terminated(run.info.run_id, "FINISHED")
    reference = f"run:clean-pretraining/{name}"
    assert run_name_reference(reference, uri) == f"runs:/{run.info.run_id}/model"
    # Later runs that merely carry the name: none of them takes over.
    client.create_run(experiment, tags=ours)  # still RUNNING
    failed = client.create_run(experiment, tags=ours)
    client.set_terminated(failed.info.run_id, "FAILED")
    other = client.create_run(experiment, tags={RUN_NAME_TAG: name, MLFLOW_USER: "intruder"})
    client.set_terminated(other.info.run_id, "FINISHED")
    untagged = client.create_run(experiment, run_name=name, tags={MLFLOW_USER: run_creator()})
    client.set_terminated(untagged.info.run_id, "FINISHED")
    assert run_name_reference(reference, uri) == f"runs:/{run.info.run_id}/model"
    # A newer finished run of ours does.
    newer = client.create_run(experiment, tags=ours)
    client.set_terminated(newer.info.run_id, "FINISHED")
    assert run_name_reference(reference, uri) == f"runs:/{newer.info.run_id}/model"
    lonely = client.create_run(experiment, tags={RUN_NAME_TAG: "planted", MLFLOW_USER: "x"})
    client.set_terminated(lonely.info.run_id, "FINISHED")
    with pytest.raises(UserError, match="no FINISHED run named 'planted'.*FINISHED by x"):
        run_name_reference("run:clean-pretraining/planted", uri)
    with pytest.raises(UserError, match="clean_vit_small_cvst"):
        run_name_reference("run:clean-pretraining/clean_vit_small_cvst", uri)
    with pytest.raises(UserError, match="run:EXPERIMENT/RUN_NAME"):
        run_name_reference("run:no-slash", uri)


@pytest.mark.parametrize("setting, culprit", [
    ("tracking.tracking_uri=http://127.0.0.1:{port}", "http://127.0.0.1:{port}"),
    ("tracking.storage_path=s3://no-such-bucket/runs", "no-such-bucket"),
])
def test_train_stops_on_a_dead_tracking_server_or_missing_bucket(setting, culprit, store,
                                                                 tmp_path, monkeypatch, capsys):
    """Before any data is written or Ray started: one line naming the server or bucket."""
    from raytrain_at.cli import main
    port = free_local_port()
    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["raytrain-at", "train", "quickstart", "--set",
                                      setting.format(port=port)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and culprit.format(port=port) in lines[0], lines
    assert not (tmp_path / "home").exists()  # nothing written


def test_units_are_dealt_by_chunk_unless_chunks_are_fewer_than_workers():
    from raytrain_at.evaluation.runner import deal_units

    pending = [(c, t) for c in range(4) for t in ("linf", "l2")]
    by_chunk = deal_units(pending, 2)
    assert by_chunk == [[(0, "linf"), (0, "l2"), (2, "linf"), (2, "l2")],
                        [(1, "linf"), (1, "l2"), (3, "linf"), (3, "l2")]]
    one_chunk = [(0, "linf"), (0, "l2"), (0, "l1")]
    assert deal_units(one_chunk, 2) == [[(0, "linf"), (0, "l1")], [(0, "l2")]]
    assert deal_units(one_chunk, 5) == [[u] for u in one_chunk]
    assert deal_units([], 2) == []
