"""``scaling.compile: true`` trains the same model as eager (issue 9, the compile switch).

A real ``WorkerLoop`` (DeepSpeed ZeRO-1 fp32 on gloo, world size 1, CPU) runs two epochs of the
same three digit batches twice, eager and compiled: DeepSpeed compiles the module in place with
inductor, the APGD step is compiled too, and the losses and final weights must agree up to float
rounding (inductor fuses and reorders arithmetic; it must not change the training). Slow: the first
compiled epoch spends ~40 s compiling on 2 cores.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from worker_loop_helpers import (FixedBatches, digit_batches, run_in_spawned_process,
                                 single_rank_environment)

from raytrain_at.config import load_config

pytestmark = pytest.mark.slow
BATCH = 16


def _child(storage: str, out: str) -> None:
    single_rank_environment()
    try:
        import deepspeed

        from raytrain_at.training.launch import prepare_data
        from raytrain_at.training.loop import WorkerLoop, WorkerPlace

        deepspeed.init_distributed(dist_backend="gloo")
        batches = digit_batches(BATCH, 3)
        result = {}
        for compiled in (False, True):
            config = load_config("quickstart", [
                "model.name=test_vit", f"scaling.compile={str(compiled).lower()}",
                f"schedule.global_batch_size={BATCH}", "scaling.num_workers=1",
                "optim.warmup_epochs=0"])
            train_path, _ = prepare_data(config, Path(storage))
            loop = WorkerLoop(config, WorkerPlace(0, 1, torch.device("cpu")), train_path, None)
            loop.train_data = FixedBatches(batches)
            losses = [loop.train_epoch()["train_loss"] for _ in range(2)]
            result[str(compiled)] = {
                "losses": losses,
                "engine_compiled": bool(loop.engine.is_compiled),
                "module_compiled": loop.engine.module._compiled_call_impl is not None,
                "weights": {k: v.tolist() for k, v in loop.engine.module.state_dict().items()},
            }
        Path(out, "result.json").write_text(json.dumps(result))
    except BaseException:
        Path(out, "error.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return run_in_spawned_process(_child, tmp_path_factory.mktemp("storage"),
                                  tmp_path_factory.mktemp("compiled"), timeout=600)


def test_compile_switch_compiles_the_trained_module(runs) -> None:
    assert runs["True"]["engine_compiled"] and runs["True"]["module_compiled"]
    assert not runs["False"]["engine_compiled"] and not runs["False"]["module_compiled"]


def test_compiled_training_matches_eager(runs) -> None:
    eager, compiled = runs["False"], runs["True"]
    assert eager["losses"][1] < eager["losses"][0]  # it trained
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert set(compiled["weights"]) == set(eager["weights"])
    worst = 0.0
    for name, value in eager["weights"].items():
        a, b = torch.tensor(value), torch.tensor(compiled["weights"][name])
        worst = max(worst, (a - b).abs().max().item())
    # AdamW moves each weight by up to ~lr (1e-3 in the quickstart) per step, 6 steps here.
    assert worst < 1e-4, f"compiled and eager weights differ by {worst}"
