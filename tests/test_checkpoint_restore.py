"""Checkpoint -> restore of a WorkerLoop is exact, and training continues identically.

In one spawned process (world size 1, gloo, DeepSpeed ZeRO-1 fp32 on CPU, the quickstart recipe
made tiny): train one epoch, ``save``, build a second loop from the same config, ``load``, and
compare weights, optimiser state, LR-schedule state, EMA, epoch and the augmentation call counter
bit for bit. Then both loops train one more epoch and must stay bit-identical.

The augmentation preset is ``heavy`` (RandAugment, erasing, MixUp/CutMix) rather than the
quickstart's ``basic``: its draws depend on the call counter of :class:`DeviceAugment`, so the
continued epoch only matches if ``load`` restores that counter.

Two things are shortened or replaced, for time and for a reason outside this project:

* The first epoch reads only the first 4 batches of the digits file through a real FFCV train
  loader (a full epoch of 46 batches takes ~20 s on 2 cores with APGD-2 and heavy augmentation).
* The continued epoch reads the same fixed batches in both loops, not the FFCV loader: FFCV's
  random-resized-crop decoder draws its crops from numba's own random generator, which FFCV does
  not seed (its ``seed`` only fixes the sample order), so two iterations of the same epoch give
  the same samples but different crops. No checkpoint can make those crops repeat.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

from raytrain_at.training.single_rank import single_rank_environment
import torch.multiprocessing as mp

FIRST_EPOCH_BATCHES = 4
CONTINUED_BATCHES = 3
BATCH = 32


class _FixedBatches:
    """Stands in for the FFCV train loader: the same batches in every epoch and every loop."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for images, labels in self.batches:
            yield images.clone(), labels.clone()


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested state dicts (dicts, lists, tensors, numbers, objects) as ``{path: leaf}``."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return {prefix: value}
    elif hasattr(value, "__dict__"):  # e.g. DeepSpeed's loss scaler
        return _flatten(vars(value), f"{prefix}<{type(value).__name__}>")
    else:
        return {prefix: repr(value)}
    flat: dict[str, object] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}/{key}"))
    return flat


def _mismatches(a, b) -> list[str]:
    """Paths where two nested states differ (tensors: dtype, shape and every bit)."""
    fa, fb = _flatten(a), _flatten(b)
    bad = sorted(set(fa) ^ set(fb))
    for key in sorted(set(fa) & set(fb)):
        x, y = fa[key], fb[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y))
        else:
            same = type(x) is type(y) and (x == y or (x != x and y != y))  # NaN == NaN here
        if not same:
            bad.append(key)
    return bad


def _frozen(value) -> dict[str, object]:
    """A flattened copy: state dicts share the live tensors, which later steps change."""
    return {key: leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf
            for key, leaf in _flatten(value).items()}


def _snapshot(loop) -> dict[str, object]:
    """Everything a restore must bring back, copied."""
    return {key: _frozen(value) for key, value in {
        "weights": loop.engine.module.state_dict(),
        "optimizer": loop.engine.optimizer.state_dict(),
        "scheduler": loop.engine.lr_scheduler.state_dict(),
        "ema": loop.ema.module.state_dict(),
        "epoch": loop.epoch,
        "selection": loop.selection.state(),
        "selected_weights": loop.selection.weights or {},
        "augment_calls": loop.augment.calls,
        "global_steps": loop.engine.global_steps,
        "lr": [group["lr"] for group in loop.engine.optimizer.param_groups],
    }.items()}


def _compare(a, b) -> dict[str, list[str]]:
    return {key: _mismatches(a[key], b[key]) for key in a}


def _child(storage: str, out: str) -> None:
    single_rank_environment()
    try:
        import numpy as np
        import deepspeed

        from raytrain_at.config import load_config
        from raytrain_at.data.ffcv_loaders import train_loader
        from raytrain_at.data.sources import digits_tensors
        from raytrain_at.training.launch import prepare_data
        from raytrain_at.training.loop import WorkerLoop, WorkerPlace

        deepspeed.init_distributed(dist_backend="gloo")
        config = load_config("quickstart", [
            f"schedule.global_batch_size={BATCH}", "scaling.num_workers=1", "schedule.epochs=3",
            "data.heldout_size=32", "aug.preset=heavy"])
        assert config.optim.zero_stage == 1 and config.optim.ema_decay is not None
        train_path, heldout_path = prepare_data(config, Path(storage))
        place = WorkerPlace(0, 1, torch.device("cpu"))

        loop = WorkerLoop(config, place, train_path, heldout_path)
        initial = {k: v.clone() for k, v in loop.engine.module.state_dict().items()}
        # As WorkerLoop builds it, restricted to the first few batches of the file.
        loop.train_data = train_loader(
            train_path, batch_size=config.per_worker_batch_size,
            resolution=config.data.resolution, seed=config.seed,
            num_workers=config.data.loader_workers, flip=config.aug.preset != "basic",
            indices=np.arange(FIRST_EPOCH_BATCHES * BATCH))
        metrics = loop.train_epoch()
        # As run() would after evaluate_heldout(): epoch 1 selected with its weights.
        loop.selection.consider(1, {"heldout_robust_accuracy": 0.25}, loop.eval_model)
        checkpoint = Path(out) / "checkpoint"
        loop.save(checkpoint)
        saved = _snapshot(loop)

        restored = WorkerLoop(config, place, train_path, heldout_path)
        fresh = _snapshot(restored)
        restored.load(checkpoint)
        after_load = _snapshot(restored)

        x, y = digits_tensors(side=config.data.resolution)
        fixed = [(x[i * BATCH:(i + 1) * BATCH].contiguous(), y[i * BATCH:(i + 1) * BATCH].contiguous())
                 for i in range(CONTINUED_BATCHES)]
        loop.train_data = _FixedBatches(fixed)
        restored.train_data = _FixedBatches(fixed)
        loop.train_epoch()
        restored.train_epoch()
        continued, continued_restored = _snapshot(loop), _snapshot(restored)

        result = {
            "first_epoch_loss": metrics["train_loss"],
            "trained": _mismatches(initial, saved["weights"]),
            "fresh_vs_saved": _compare(saved, fresh),
            "restored_vs_saved": _compare(saved, after_load),
            "continued": _compare(continued, continued_restored),
            "moved_in_continued_epoch": _mismatches(saved["weights"], continued["weights"]),
            "epochs": [snap["epoch"][""] for snap in (saved, after_load, continued, continued_restored)],
            "optimizer_type": type(loop.engine.optimizer).__name__,
            "optimizer_tensors": sum(isinstance(v, torch.Tensor)
                                     for v in _flatten(saved["optimizer"]).values()),
            "scheduler_last_epoch": [saved["scheduler"]["/last_epoch"],
                                     after_load["scheduler"]["/last_epoch"]],
            "augment_calls": [snap["augment_calls"][""] for snap in
                              (saved, after_load, continued, continued_restored)],
        }
        Path(out, "result.json").write_text(json.dumps(result))
    except BaseException:
        Path(out, "error.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    storage = tmp_path_factory.mktemp("storage")
    out = tmp_path_factory.mktemp("restore")
    process = mp.get_context("spawn").Process(target=_child, args=(str(storage), str(out)))
    process.start()
    process.join(timeout=480)
    if process.is_alive():
        process.kill()
        pytest.fail("the checkpoint round trip did not finish in 480 s")
    error = out / "error.txt"
    assert process.exitcode == 0 and not error.exists(), (
        f"child exited with {process.exitcode}:\n{error.read_text() if error.exists() else ''}")
    return json.loads((out / "result.json").read_text())


def test_restore_is_exact(result) -> None:
    # The checkpoint holds a trained state that a freshly built loop does not have.
    assert result["optimizer_type"] == "DeepSpeedZeroOptimizer"
    assert result["trained"], "the first epoch did not change the weights"
    assert result["optimizer_tensors"] > 0
    assert result["scheduler_last_epoch"] == [FIRST_EPOCH_BATCHES, FIRST_EPOCH_BATCHES]
    fresh = result["fresh_vs_saved"]
    for key in ("weights", "optimizer", "scheduler", "ema", "epoch", "augment_calls"):
        assert fresh[key], f"a fresh loop already has the saved {key}: the check proves nothing"
    # After load everything matches bit for bit.
    restored = result["restored_vs_saved"]
    assert restored == {key: [] for key in restored}, restored
    assert result["epochs"][:2] == [1, 1]
    assert result["augment_calls"][:2] == [FIRST_EPOCH_BATCHES, FIRST_EPOCH_BATCHES]


def test_training_continues_identically(result) -> None:
    assert result["moved_in_continued_epoch"], "the continued epoch did not change the weights"
    continued = result["continued"]
    assert continued == {key: [] for key in continued}, continued
    assert result["epochs"][2:] == [2, 2]
    assert result["augment_calls"][2:] == [FIRST_EPOCH_BATCHES + CONTINUED_BATCHES] * 2
