"""Preflight: the estimate, the loader verdict, and the driver's blockers (no Ray start)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.preflight.driver import check_storage, check_weights
from raytrain_at.preflight.estimate import estimate_run, price_table
from raytrain_at.preflight.verdicts import loader_check
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
