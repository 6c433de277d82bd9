"""``scaling.compile: true`` trains the same model as eager (issue 9, the compile switch).

A real ``WorkerLoop`` (DeepSpeed ZeRO-1 fp32 on gloo, world size 1, CPU) runs two epochs of the
same three digit batches twice, eager and compiled: DeepSpeed compiles the module in place with
inductor, the APGD step is compiled too, and the losses and final weights must agree up to float
rounding (inductor fuses and reorders arithmetic; it must not change the training). Slow: the first
compiled epoch spends ~40 s compiling on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from raytrain_at.config import load_config

pytestmark = pytest.mark.slow
BATCH = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Batches:
    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for images, labels in self.batches:
            yield images.clone(), labels.clone()


def _child(storage: str, out: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    try:
        import deepspeed

        from raytrain_at.data.sources import digits_tensors
        from raytrain_at.training.launch import prepare_data
        from raytrain_at.training.loop import WorkerLoop, WorkerPlace

        deepspeed.init_distributed(dist_backend="gloo")
        x, y = digits_tensors(side=32)
        batches = [(x[i * BATCH:(i + 1) * BATCH].contiguous(),
                    y[i * BATCH:(i + 1) * BATCH].contiguous()) for i in range(3)]
        result = {}
        for compiled in (False, True):
            config = load_config("quickstart", [
                "model.name=test_vit", f"scaling.compile={str(compiled).lower()}",
                f"schedule.global_batch_size={BATCH}", "scaling.num_workers=1",
                "optim.warmup_epochs=0"])
            train_path, _ = prepare_data(config, Path(storage))
            loop = WorkerLoop(config, WorkerPlace(0, 1, torch.device("cpu")), train_path, None)
            loop.train_data = _Batches(batches)
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
    storage = tmp_path_factory.mktemp("storage")
    out = tmp_path_factory.mktemp("compiled")
    process = mp.get_context("spawn").Process(target=_child, args=(str(storage), str(out)))
    process.start()
    process.join(timeout=600)
    if process.is_alive():
        process.kill()
        pytest.fail("the training process did not finish in 600 s")
    error = out / "error.txt"
    assert not error.exists(), error.read_text()
    return json.loads((out / "result.json").read_text())


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
