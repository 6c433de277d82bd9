"""Preflight: the estimate, the loader verdict, the driver's blockers, the workers' meeting and
the clean-up (no Ray start; the end-to-end runs are in test_preflight_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.train import WorkerGroupError

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.runtime import storage
from raytrain_at.preflight.driver import check_storage, check_weights
from raytrain_at.preflight.estimate import estimate_run, price_table
from raytrain_at.preflight.run import remove_run_folder, worker_failure_line
from raytrain_at.preflight import run, worker
from raytrain_at.preflight.verdicts import device_check, loader_check
from raytrain_at.preflight.worker import ROWS_FILE, device_row
from raytrain_at.training.loop import WorkerPlace
from tests.support.cli_runner import run_cli


def _row(loader: float, step: float) -> dict:
    return {"rank": 0, "loader_images_per_s": loader, "step_images_per_s": step}


def test_estimate_is_epochs_times_steps_times_step_and_priced():
    price = price_table()["instances"]["p4d.24xlarge"]
    est = estimate_run(samples=1_281_167, global_batch=4096, epochs=300, step_s=1.5,
                       instance="p4d.24xlarge", instances=2)
    assert est.steps_per_epoch == 312  # the last partial batch is dropped
    assert est.wall_s == pytest.approx(300 * 312 * 1.5)
    hours = 300 * 312 * 1.5 / 3600
    assert est.on_demand_usd == pytest.approx(round(hours * 2 * price["on_demand"], 2))
    assert est.spot_usd == pytest.approx(round(hours * 2 * price["spot"], 2))
    assert est.spot_usd < est.on_demand_usd


def test_estimate_refuses_an_unknown_instance():
    with pytest.raises(UserError, match="'p9.huge' is not in the price table"):
        estimate_run(samples=100, global_batch=10, epochs=1, step_s=1.0, instance="p9.huge")


def test_a_loader_slower_than_the_step_is_a_blocker_naming_the_setting():
    config = load_config("quickstart", ["data.loader_workers=1"])
    check = loader_check([_row(loader=500.0, step=800.0)], config)
    assert check.blocker is not None
    assert "data.loader_workers=1" in check.blocker and "scaling.cpus_per_worker" in check.blocker
    assert loader_check([_row(loader=900.0, step=800.0)], config).passed


def test_an_unwritable_storage_root_is_a_blocker(tmp_path: Path):
    (tmp_path / "a-file").write_text("x")  # a folder under a file: unwritable, even to root
    root = tmp_path / "a-file" / "runs"
    check = check_storage(str(root))
    assert check.blocker is not None and str(root) in check.blocker
    assert check_storage(str(tmp_path / "fine")).passed
    assert not list((tmp_path / "fine").iterdir())  # the probe was deleted


def test_a_broken_weights_file_is_a_blocker(tmp_path: Path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01 this is not a safetensors file")
    check = check_weights(load_config("quickstart", [f"model.init={broken}"]))
    assert check.blocker is not None and "broken.safetensors" in check.blocker


@pytest.mark.parametrize("case", ["weights", "storage"])
def test_preflight_cli_blocker_is_one_line_and_exit_1(case: str, tmp_path: Path):
    env = {**os.environ, "RAYTRAIN_AT_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    if case == "weights":
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(b"not weights")
        args = ["preflight", "quickstart", "--set", f"model.init={broken}",
                "--storage-path", str(tmp_path / "runs")]
    else:
        (tmp_path / "a-file").write_text("x")
        root = tmp_path / "a-file" / "runs"
        args = ["preflight", "quickstart", "--storage-path", str(root)]
    out = run_cli(args, env=env, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stderr
    assert len(errors) == 1 and f"preflight {case}:" in errors[0]
    assert "Traceback" not in out.stderr


# Two ranks of one gloo group, with no Ray: three rounds of worker_rows, in which no rank, rank 1
# and then rank 0 lack their device. The measure step runs an all-reduce, the collective a rank
# that lacks its device never enters: were that rank to skip it, the other would wait in it
# until the group's 20 s timeout and fail.
_RANK = r"""
import datetime, json, sys
import torch, torch.distributed as dist
from raytrain_at.preflight.gather import worker_rows

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=20))
rounds = []
for failing in (None, 1, 0):
    measured = []

    def measure():
        total = torch.ones(1)
        dist.all_reduce(total)
        measured.append(float(total))
        return {"measured": float(total)}

    device = {"rank": rank, **({"error": "no CUDA device"} if rank == failing else {})}
    rounds.append({"rows": worker_rows(device, 2, measure), "measured": measured})
dist.destroy_process_group()
with open(out, "w") as handle:
    json.dump(rounds, handle)
"""


def test_a_rank_without_its_device_stops_every_rank_before_any_other_collective(tmp_path: Path):

    store = tmp_path / "store"
    outs = [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(rank), str(store), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, out in enumerate(outs)]
    logs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    for out in outs:
        healthy, rank1_fails, rank0_fails = json.loads(out.read_text())
        assert healthy["measured"] == [2.0]
        assert healthy["rows"] == [{"rank": 0, "measured": 2.0}, {"rank": 1, "measured": 2.0}]
        for case, failing in ((rank1_fails, 1), (rank0_fails, 0)):
            assert case["measured"] == []  # neither rank went on to the all-reduce
            assert [("error" in row) for row in case["rows"]] == [failing == 0, failing == 1]


def test_the_loader_margin_turns_measured_figures_into_a_blocker():
    # Worker 0 of `raytrain-at preflight quickstart` on 2 cores (2026-12-07): a 1,200x margin.
    config = load_config("quickstart")
    measured = [{"rank": 0, "loader_images_per_s": 107758.4, "step_images_per_s": 89.3},
                {"rank": 1, "loader_images_per_s": 98000.0, "step_images_per_s": 90.1}]
    assert loader_check(measured, config).passed
    assert loader_check(measured, config, margin=1000.0).passed
    check = loader_check(measured, config, margin=1200.0)
    assert check.blocker is not None
    assert check.blocker.startswith("worker 1's loader gives 98000.0 img/s")
    assert "below --loader-margin 1200 x its step's 90.1 img/s" in check.blocker


def test_the_run_folder_is_removed_and_a_missing_one_is_no_error(tmp_path: Path):
    runs = tmp_path / "runs"
    (runs / "preflight-1234abcd" / "checkpoint_000000").mkdir(parents=True)
    (runs / "preflight-1234abcd" / "checkpoint_000000" / ROWS_FILE).write_text("[]")
    (runs / "another-run").mkdir()
    remove_run_folder(str(runs), "preflight-1234abcd")
    assert sorted(p.name for p in runs.iterdir()) == ["another-run"]
    remove_run_folder(str(runs), "preflight-1234abcd")  # already gone: nothing to do


def test_a_failed_worker_is_one_line_naming_its_rank_and_error():
    error = WorkerGroupError("long Ray text\nmore lines", {
        1: RuntimeError("CUDA error: out of memory\nCompile with TORCH_USE_CUDA_DSA"),
        0: ValueError("")})
    assert worker_failure_line(error) == "worker 0 failed: ValueError"
    del error.worker_failures[0]
    assert worker_failure_line(error) == "worker 1 failed: RuntimeError: CUDA error: out of memory"


def test_an_unknown_instance_is_refused_before_any_check(tmp_path: Path):
    env = {**os.environ, "RAYTRAIN_AT_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = run_cli(["preflight", "quickstart", "--instance", "p9.huge",
                   "--storage-path", str(tmp_path / "runs")], env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --instance 'p9.huge' is not")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_device_check_that_raises_is_an_error_row_not_an_exception(monkeypatch):
    # A node whose driver is older than torch's CUDA build raises on the first CUDA call: the
    # rank must still reach the gather of device rows (see the two-rank test above).
    def broken(device, want_gpu):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nmore")

    place = WorkerPlace(rank=1, world_size=2, device=torch.device("cpu"))
    config = load_config("quickstart")
    assert "error" not in device_row(config, place)
    assert device_row(load_config("quickstart", ["scaling.use_gpu=true"]), place)["error"] == (
        "no CUDA device on this worker")
    monkeypatch.setattr(worker, "device_facts", broken)
    row = device_row(config, place)
    assert row["rank"] == 1 and row["torch"] == torch.__version__
    assert row["error"] == ("the device check raised RuntimeError: CUDA driver version is "
                            "insufficient for CUDA runtime version")
    check = device_check([{**row, "rank": 0, "node": "n0"}, row], config)
    assert check.blocker is not None and check.blocker.startswith("worker 0 on n0: the device")


def test_a_multi_node_cluster_without_a_storage_root_is_a_storage_blocker(monkeypatch):
    # Rank 0's rows would land on a worker node's own disk: refused before any worker starts,
    # in the words of train's own refusal.

    def no_workers(*args, **kwargs):
        raise AssertionError("the workers were started")

    monkeypatch.setattr(run, "init_ray", lambda address: None)
    monkeypatch.setattr(storage, "alive_nodes", lambda: 3)
    monkeypatch.setattr(run, "TorchTrainer", no_workers)
    report = run.PreflightReport()
    prepared = SimpleNamespace(config=load_config("quickstart"), shared_storage=False,
                               storage_path="/nowhere/runs", run_name="preflight-00000000")
    run._worker_checks(prepared, run.PreflightSettings(address="auto"), report)
    [check] = report.checks
    assert check.name == "storage" and check.blocker is not None
    assert check.blocker.startswith("the preflight on a 3-node Ray cluster needs a storage root")
    assert "RAYTRAIN_AT_STORAGE" in check.blocker
    prepared.shared_storage = True
    monkeypatch.setattr(run, "_run_workers", lambda prepared, settings: None)
    report = run.PreflightReport()
    run._worker_checks(prepared, run.PreflightSettings(address="auto"), report)
    assert [(c.name, c.blocker) for c in report.checks] == [
        ("workers", "the workers reported no figures")]


def test_train_with_preflight_refuses_its_own_bad_input_before_the_preflight(tmp_path: Path):
    env = {**os.environ, "RAYTRAIN_AT_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = run_cli(["train", "quickstart", "--preflight", "--run-name", "../escape",
                   "--storage-path", str(tmp_path / "runs")], env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: run name '../escape':")
    assert "preflight" not in out.stdout and not (tmp_path / "runs").exists()
