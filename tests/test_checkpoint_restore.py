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
import re
import shutil
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from raytrain_at.training.single_rank import single_rank_environment
import torch.multiprocessing as mp

# The trained fixture these tests share takes about 70 s on 2 cores: CI's end-to-end stage
# (.ci/run) runs these tests, `make test` leaves them out (issue 32's budget).
pytestmark = pytest.mark.slow

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


class _Canary:
    """A pickle payload: unpickling it creates ``marker`` (what a planted file would run)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@dataclass
class _Folder:
    """A local checkpoint folder in the shape of ``ray.train.Checkpoint``."""

    path: str

    def as_directory(self):
        return nullcontext(self.path)


def _plant(checkpoint: Path, target: Path, relative: str, marker: Path) -> Path:
    """A copy of ``checkpoint`` whose file ``relative`` carries a :class:`_Canary`, with the
    manifests rewritten to match (someone who can write the folder can write them too)."""
    from raytrain_at.training.checkpoint_manifest import write_manifest

    shutil.copytree(checkpoint, target)
    path = target / relative
    state = torch.load(path, weights_only=False)  # our own file, written by this test
    state["note"] = _Canary(str(marker))
    torch.save(state, path, _use_new_zipfile_serialization=False)  # as DeepSpeed writes
    write_manifest(target, 0, 1)
    return path


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

        from raytrain_at.errors import UserError
        from raytrain_at.training.checkpoint_manifest import (checkpoint_problem,
                                                              restore_first_good)

        added_start = time.perf_counter()
        # The next checkpoint (epoch 2), then truncated as an interrupted upload leaves it:
        # the resume takes the one before, with one line naming the skipped one.
        newest = Path(out) / "checkpoint-epoch2"
        loop.save(newest)
        problems = [checkpoint_problem(checkpoint), checkpoint_problem(newest)]
        # Epoch 2 changed no selection: its checkpoint holds no copy of epoch 1's weights,
        # and a resume from it reads them from epoch 1's checkpoint, as the launcher does.
        from ray.train import Checkpoint

        from raytrain_at.training.loop import SELECTED_FILE, STATE_FILE
        from raytrain_at.training.selected_weights import selected_from_earlier

        newest_files = sorted(p.name for p in newest.glob("*.safetensors")
                              if p.name != "portable_state.safetensors")  # optimiser state
        holds_selection = loop.save(Path(out) / "checkpoint-epoch2-again")
        try:
            restored.load(newest)
            without_lookup = ""
        except UserError as exc:
            without_lookup = str(exc)
        restored.selection.weights = None  # what it held must come back from epoch 1's
        restored.load(newest, lambda epoch, name: selected_from_earlier(
            [Checkpoint.from_directory(str(checkpoint))], epoch, name, STATE_FILE))
        resumed_vs_continued = _compare(_snapshot(restored), _snapshot(loop))
        optim_file = next(newest.glob("state/*optim_states.pt"))
        optim_file.write_bytes(optim_file.read_bytes()[: optim_file.stat().st_size // 2])
        lines: list[str] = []
        chosen = restore_first_good(_Folder(str(newest)), lambda: [_Folder(str(checkpoint))],
                                    restored.load, say=lines.append)
        after_fallback = _snapshot(restored)

        # Pickle canaries in DeepSpeed's two files, manifests rewritten to match.
        refusals, markers = {}, {}
        for name, relative in (("model", "state/mp_rank_00_model_states.pt"),
                               ("optimizer", optim_file.relative_to(newest).as_posix())):
            marker = Path(out) / f"canary-{name}-ran"
            planted = _plant(checkpoint, Path(out) / f"planted-{name}", relative, marker)
            try:
                restored.load(planted.parents[1])
                refusals[name] = None
            except UserError as exc:
                refusals[name] = str(exc)
            markers[name] = [str(planted), checkpoint_problem(planted.parents[1]),
                             marker.exists()]
        # A checkpoint whose conv weights ZeRO holds NHWC (a CUDA run with channels_last)
        # into this NCHW run: the flat optimiser state would pair other elements; refused.
        nhwc = Path(out) / "checkpoint-nhwc"
        shutil.copytree(checkpoint, nhwc)
        state_file = nhwc / STATE_FILE
        state_file.write_text(json.dumps(dict(json.loads(state_file.read_text()),
                                              nhwc_weights=True)))
        try:
            restored.load(nhwc)
            refusals["layout"] = None
        except UserError as exc:
            refusals["layout"] = str(exc)
        # The payload is live: DeepSpeed's own loader (which the engine wraps) runs it.
        live = Path(out) / "canary-live-ran"
        planted = _plant(checkpoint, Path(out) / "planted-live", "state/mp_rank_00_model_states.pt",
                         live)
        restored.engine.checkpoint_engine._inner.load(str(planted))
        # A NaN weight makes the loss NaN: run() stops within the epoch, before any report or
        # checkpoint; rank 0 at its first progress report, any rank at the epoch's end.
        from raytrain_at.errors import NonFiniteLoss

        stops = {}
        for name, progress in (("progress", lambda _: None), ("epoch_end", None)):
            with torch.no_grad():
                restored.engine.module.backbone.head.fc.weight.fill_(float("nan"))
            restored.train_data = _FixedBatches(fixed)
            restored.on_progress = progress
            restored.config.schedule.log_every_steps = 1
            reports: list = []
            root = Path(out) / f"nan-{name}"
            epoch_before = restored.epoch
            try:
                restored.run(lambda metrics, _, sink=reports: sink.append(metrics), root)
                stops[name] = None
            except NonFiniteLoss as exc:
                stops[name] = [str(exc), reports, root.exists(), restored.epoch - epoch_before]
        added_seconds = time.perf_counter() - added_start

        result = {
            "first_epoch_loss": metrics["train_loss"],
            "trained": _mismatches(initial, saved["weights"]),
            "fresh_vs_saved": _compare(saved, fresh),
            "restored_vs_saved": _compare(saved, after_load),
            "continued": _compare(continued, continued_restored),
            "manifest_problems": problems,
            "newest_files": newest_files, "newest_holds_selection": holds_selection,
            "without_lookup": without_lookup, "resumed_vs_continued": resumed_vs_continued,
            "fallback_chosen": chosen.path == str(checkpoint),
            "fallback_lines": lines,
            "fallback_vs_saved": _compare(saved, after_fallback),
            "newest_vs_saved": _compare(saved, continued_restored),
            "refusals": refusals,
            "canaries": markers,
            "live_canary_ran": live.exists(),
            "integrity_checks_seconds": added_seconds,
            "nan_stops": stops,
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


def test_a_checkpoint_that_changed_no_selection_points_to_the_one_that_holds_it(result) -> None:
    # Epoch 1 is selected; epoch 2's checkpoint writes its own weights only (no second copy).
    assert result["newest_files"] == ["model.safetensors"]
    assert result["newest_holds_selection"] is False
    # Resumed from it, the loop is the one that wrote it, bit for bit, the selected weights
    # (epoch 1's, read from epoch 1's checkpoint) included; without the lookup, one line.
    resumed = result["resumed_vs_continued"]
    assert resumed == {key: [] for key in resumed}, resumed
    assert "selected weights in the checkpoint of epoch 1" in result["without_lookup"]


def test_truncated_latest_checkpoint_falls_back_to_the_one_before(result) -> None:
    assert result["manifest_problems"] == [None, None]  # both verified when written
    assert result["fallback_chosen"]
    # One line: which checkpoint was skipped, and why (the truncated file, its sizes).
    [line] = result["fallback_lines"]
    assert "checkpoint-epoch2" in line and "optim_states.pt is " in line and "bytes" in line
    assert line.startswith("resuming from the earlier checkpoint ") and "\n" not in line
    # The loop held epoch 2's state; after the fallback it is epoch 1's, bit for bit.
    assert all(result["newest_vs_saved"][key] for key in ("weights", "optimizer", "epoch"))
    fallback = result["fallback_vs_saved"]
    assert fallback == {key: [] for key in fallback}, fallback


def test_pickle_payload_in_a_checkpoint_never_runs(result) -> None:
    print("integrity checks took", round(result["integrity_checks_seconds"], 1), "s")
    assert result["live_canary_ran"], "the planted payload is inert: the check proves nothing"
    for name, (path, problem, ran) in result["canaries"].items():
        assert problem is None, (name, problem)  # its checksums match: only the load stops it
        assert not ran, f"the {name} file's payload ran"
        message = result["refusals"][name]
        assert re.fullmatch(rf"checkpoint file {re.escape(path)} holds a pickled object that is "
                            r"not training state \(Unsupported global: GLOBAL (builtins\.)?exec\): "
                            "refused to load it", message), message


def test_a_checkpoint_of_another_conv_layout_is_refused(result) -> None:
    message = result["refusals"]["layout"]
    assert message is not None and "checkpoint-nhwc" in message
    assert "channels_last" in message and "\n" not in message


def test_a_non_finite_loss_stops_the_run_before_its_checkpoint(result) -> None:
    stops = result["nan_stops"]
    for name, step in (("progress", 1), ("epoch_end", CONTINUED_BATCHES)):
        assert stops[name] is not None, f"a NaN loss did not stop the run ({name})"
        message, reports, wrote_checkpoint, epochs_done = stops[name]
        assert message == (f"the training loss is nan in epoch 2 (by step {step}): training "
                           "stopped; the last checkpoint before this epoch is kept (lower "
                           "optim.lr, set optim.grad_clip, or check the data)")
        assert reports == [] and not wrote_checkpoint and epochs_done == 0
