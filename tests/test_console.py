"""The quiet console: worker output filtered on the driver and kept in a file, rank 0's progress
hook called every ``log_every_steps`` steps, and Ray started on this machine or not at all."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
from worker_loop_helpers import (FixedBatches, digit_batches, run_in_spawned_process,
                                 single_rank_environment)

from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.runtime.worker_output import WorkerOutput
from raytrain_at.training.progress import epoch_line, progress_bar


def _batch(*lines: str, pid: int = 41, actor: str = "RayTrainWorker") -> dict:
    return {"pid": pid, "actor_name": actor, "lines": list(lines), "is_err": False}


def test_worker_output_keeps_everything_and_shows_only_the_users_lines(tmp_path) -> None:
    screen = io.StringIO()  # not a terminal
    output = WorkerOutput(show_user_lines=True, stream=screen)
    output.open(tmp_path / "console.log")
    output(_batch("Reporting training result 1: TrainingReport(...)",
                  "[raytrain-at] ~ run epoch 1/2 [##..] 2/4 loss 1.000",
                  "FutureWarning: all_gather_into_tensor is deprecated"))
    output(_batch("[raytrain-at] epoch 1/2 loss 1.000", pid=42))
    output({"pid": "autoscaler", "lines": ["======== Autoscaler status ========"]})
    output.close_file()
    assert screen.getvalue().splitlines() == ["run epoch 1/2 [##..] 2/4 loss 1.000",
                                              "epoch 1/2 loss 1.000"]
    kept = (tmp_path / "console.log").read_text().splitlines()
    assert kept[0] == "(RayTrainWorker pid=41) Reporting training result 1: TrainingReport(...)"
    assert len(kept) == 4 and not any("Autoscaler" in line for line in kept)
    assert "\x1b[" not in screen.getvalue()


def test_verbose_mode_shows_nothing_itself_but_still_keeps_the_file(tmp_path) -> None:
    screen = io.StringIO()
    output = WorkerOutput(show_user_lines=False, stream=screen)  # Ray's own handler prints
    output.open(tmp_path / "console.log")
    output(_batch("[raytrain-at] epoch 1/2 loss 1.000"))
    output.close_file()
    assert screen.getvalue() == "" and "epoch 1/2" in (tmp_path / "console.log").read_text()


def test_progress_lines_replace_each_other_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    output = WorkerOutput(show_user_lines=True, stream=screen)
    output(_batch("[raytrain-at] ~ step 1", "[raytrain-at] ~ step 2", "[raytrain-at] epoch 1"))
    assert screen.getvalue() == "step 1\r\x1b[Kstep 2\r\x1b[Kepoch 1\n"


def test_line_formats() -> None:
    assert progress_bar(5, 20, width=8) == "[##......]"
    assert progress_bar(20, 20, width=8) == "[########]"
    line = epoch_line({"epoch": 3, "train_loss": 1.23456, "train_accuracy": 0.5,
                       "heldout_clean_accuracy": 0.9, "heldout_robust_accuracy": 0.75,
                       "epoch_seconds": 125.0}, epochs=6)
    assert line == ("epoch 3/6 loss 1.235 train acc 0.500 held-out clean 0.900 robust 0.750 "
                    "(2:05)")


# --------------------------------------------------------------------------- the loop's hook
def _progress_child(storage: str, out: str) -> None:
    single_rank_environment()
    try:
        import deepspeed

        from raytrain_at.training.launch import prepare_data
        from raytrain_at.training.loop import WorkerLoop, WorkerPlace

        deepspeed.init_distributed(dist_backend="gloo")
        config = load_config("quickstart", [
            "model.name=test_resnet", "schedule.global_batch_size=16", "scaling.num_workers=1",
            "schedule.log_every_steps=2", "attack.kind=fgsm", "schedule.epochs=3"])
        train_path, _ = prepare_data(config, Path(storage))
        loop = WorkerLoop(config, WorkerPlace(0, 1, torch.device("cpu")), train_path, None)
        loop.train_data = FixedBatches(digit_batches(16, 5))
        seen = []
        loop.on_progress = lambda p: seen.append(p.__dict__.copy())
        loop.train_epoch()
        loop.train_epoch()
        Path(out, "result.json").write_text(json.dumps({"progress": seen}))
    except BaseException:
        Path(out, "error.txt").write_text(traceback.format_exc())
        raise


@pytest.mark.slow  # a real DeepSpeed engine in a spawned process: ~15-40 s here
def test_progress_hook_every_log_every_steps(tmp_path) -> None:
    """5 steps per epoch, log_every_steps=2: reports after steps 2 and 4 (the epoch's own report
    covers the end), with the interval's figures."""
    result = run_in_spawned_process(_progress_child, tmp_path / "storage", tmp_path,
                                    timeout=300)
    seen = result["progress"]
    assert [(p["epoch"], p["step"], p["global_step"]) for p in seen] == [
        (1, 2, 2), (1, 4, 4), (2, 2, 7), (2, 4, 9)]
    for p in seen:
        assert p["steps"] == 5 and p["epochs"] == 3
        assert 0 < p["loss"] < 10 and 0 <= p["accuracy"] <= 1
        assert p["images_per_s"] > 0 and p["lr"] > 0 and p["eta_s"] >= 0
    assert seen[0]["eta_s"] > seen[1]["eta_s"]  # 3 steps left, then 1


# --------------------------------------------------------------------------- where Ray runs
def test_unreachable_address_is_one_line_naming_it() -> None:
    from raytrain_at.runtime.ports import free_local_port
    from raytrain_at.runtime.ray_init import check_reachable

    port = free_local_port()  # nobody listens on it
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"--address 127.0.0.1:{port}: no Ray cluster answers "
                                        rf"at 127.0.0.1:{port} after 2 s"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - started < 10
    with pytest.raises(UserError, match="is not HOST:PORT"):
        check_reachable("no-port-here", timeout_s=1)


@pytest.mark.slow
def test_local_ray_ignores_a_recorded_dead_cluster() -> None:
    """A head started with `ray start` that died leaves its address in Ray's temporary folder;
    a plain ray.init() would try to join it for ever. Ours starts its own instance."""
    short = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    (Path(short) / "ray").mkdir()
    (Path(short) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    env = dict(os.environ, RAY_TMPDIR=short)
    env.pop("RAY_ADDRESS", None)
    code = ("import ray; from raytrain_at.runtime.ray_init import init_ray; init_ray(); "
            "print(ray.cluster_resources().get('CPU', 0)); ray.shutdown()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=240, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) > 0
