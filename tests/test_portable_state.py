"""A checkpoint of 2 workers restores into 1, 2 and 3 workers with the same state, and the next
step gives the same weights at every size (training.portable_state through WorkerLoop).

Ranks are gloo CPU processes (tests/support/gloo_ranks.py), each a real ``WorkerLoop`` (the
quickstart recipe with the rank tests' tiny ConvNeXt + ConvStem, DeepSpeed) in four settings:
ZeRO-1 and ZeRO-2, in fp32 and in bf16 (ZeRO-1 bf16 steps through DeepSpeed's BF16_Optimizer,
the others through its ZeRO optimiser). One spawn runs three gloo jobs side by side (see JOBS):
the 2-rank job trains a few steps on fixed digit batches, saves (each rank into a folder of its
own, merged afterwards as Ray Train merges them) and records the state, gathered with
DeepSpeed's own tensor-fragment calls (independently of the module under test); each job (1, 2
and 3 ranks) then loads that checkpoint, records the state again and takes one more step on the
same global batch split over its ranks.

Equal means bit for bit for the fp32 master weights, both AdamW moments, the step counts, LR,
scheduler, EMA and model weights. After the extra step the sizes may differ by rounding only:
the gradient is the mean over ranks of per-rank means (another order of the same sums), so the
weights agree within STEP_TOLERANCE (AdamW moves each weight by about lr = 2e-3 a step; bf16
rounds more, see there).
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.support.gloo_ranks import rank_environment, spawn_ranks, tiny_convnext_cvst

pytestmark = pytest.mark.slow

VARIANTS = (("zero1", 1, "fp32"), ("zero2", 2, "fp32"), ("zero1-bf16", 1, "bf16"),
            ("zero2-bf16", 2, "bf16"))
SAVED_WORLD = 2
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3
TRAIN_STEPS = 3
# Largest |difference| after the extra step between world sizes, of a step of about 2e-3. fp32:
# the same sums in another order. bf16: the forward runs in bf16 (8 bits of mantissa) at another
# per-rank batch, which rounds differently, and AdamW divides by sqrt(exp_avg_sq), so weights
# with small gradients pass those differences on (measured 1e-4 to 2.3e-4).
# The EMA lerps the live (bf16) weights in with weight 1 - decay = 0.1: a weight in [1, 2) (the
# norm weights start at 1) rounded to its neighbouring bf16 value, 2**-7 away, moves it by
# 0.1 * 2**-7 = 7.8e-4 (measured 3.9e-4: one such step of a weight in [0.5, 1)).
STEP_TOLERANCE = {"fp32": {"": 1e-5}, "bf16": {"": 5e-4, "ema/": 1e-3}}


def _config(stage: int, precision: str, world: int):
    from raytrain_at.config import load_config

    return load_config("quickstart", [
        f"optim.zero_stage={stage}", f"scaling.precision={precision}",
        f"scaling.num_workers={world}", f"schedule.global_batch_size={GLOBAL_BATCH}",
        # No warm-up: the extra step moves each weight by about lr = 2e-3, far above the
        # tolerance, which a warm-up's first steps (lr / steps per epoch) would not.
        "optim.warmup_epochs=0", "objective.kind=clean", "attack.kind=none"])


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from tests.worker_loop_helpers import digit_batches

    return digit_batches(GLOBAL_BATCH, TRAIN_STEPS + 1)


def _part(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int):
    size = GLOBAL_BATCH // world
    return tuple(t[rank * size:(rank + 1) * size].contiguous() for t in batch)


def _gathered(loop) -> dict[str, object]:
    """The loop's whole state, gathered with DeepSpeed's fragment API (a collective: every rank
    calls it); meaningful on rank 0."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = loop.engine
    inner = engine.optimizer.optimizer
    if inner.state:
        # DeepSpeed links each parameter's moment fragments once, after a step, and a
        # checkpoint load unlinks them: link them to the current moments (in-place views).
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state: dict[str, object] = {}
    for name, param in engine.module.named_parameters():
        state[f"master/{name}"] = safe_get_full_fp32_param(param).clone()
        if inner.state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).clone()
    for name, value in engine.module.state_dict().items():
        state[f"weight/{name}"] = value.clone()
    for name, value in loop.ema.module.state_dict().items():
        state[f"ema/{name}"] = value.clone()
    for index, group in enumerate(inner.param_groups):
        step = inner.state.get(group["params"][0], {}).get("step")
        state[f"step/{index}"] = None if step is None else float(step)
        state[f"lr/{index}"] = group["lr"]
    scheduler = engine.lr_scheduler.state_dict()
    state.update({"scheduler/last_epoch": scheduler["last_epoch"],
                  "scheduler/last_lr": list(scheduler["_last_lr"]),
                  "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                  "epoch": loop.epoch, "augment_calls": loop.augment.calls,
                  "optimizer_type": type(engine.optimizer).__name__})
    return state


def _loop(stage: int, precision: str, rank: int, world: int, train_path: str):
    from raytrain_at.training import loop as loop_module
    from raytrain_at.training.loop import WorkerLoop, WorkerPlace

    # The rank tests' tiny ConvNeXt + ConvStem (same architecture as the recipe's atto, a
    # tenth of its weights): the gathers and steps of 6 ranks on 2 cores stay short.
    loop_module.build_model_and_report = lambda config: (tiny_convnext_cvst(), None)
    return WorkerLoop(_config(stage, precision, world),
                      WorkerPlace(rank, world, torch.device("cpu")), train_path, None)


def _step(loop, batch, rank: int, world: int) -> None:
    images, targets = _part(batch, rank, world)
    loop.train_step(None, images, targets)


# One spawn of 6 processes, three independent gloo jobs: the 2-rank job trains and saves, while
# the 1- and 3-rank jobs start (imports, DeepSpeed) and wait for each checkpoint. Sequential
# spawns would cost each job's start-up (about 30 s of imports on 2 cores) in turn.
JOBS = ((SAVED_WORLD, True), (1, False), (3, False))  # (world size, saves)
WAIT_S = 240


def _job_of(index: int) -> tuple[int, int, int, bool]:
    """(job, world size, rank, saves) of spawned process ``index``."""
    for job, (world, saves) in enumerate(JOBS):
        if index < world:
            return job, world, index, saves
        index -= world
    raise ValueError(index)


def _worker(index: int, port: int, out: str) -> None:
    job, world, rank, saves = _job_of(index)
    rank_environment(rank, world, port)
    try:
        root = Path(out)
        # A store file per job: three process groups side by side, no ports to find.
        dist.init_process_group("gloo", init_method=f"file://{root}/store-{job}", rank=rank,
                                world_size=world)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the group above
        _run(rank, world, root, saves)
    except BaseException:
        Path(out, f"rank{index}.err").write_text(traceback.format_exc())
        raise


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written in {WAIT_S} s")
        time.sleep(0.2)


def _run(rank: int, world: int, root: Path, save: bool) -> None:
    """The saving job trains, saves (a folder per rank, merged by rank 0), records; every job
    then restores, records, takes one more step and records."""
    from raytrain_at.errors import UserError
    from raytrain_at.training.portable_state import PORTABLE_FILE

    train_path = (root / "train_path").read_text()
    batches = _batches()
    clock = time.perf_counter()
    for name, stage, precision in VARIANTS:
        def mark(what: str, name: str = name) -> None:
            if rank == 0:  # where the time goes, printed by the fixture
                with open(root / "timings.txt", "a") as handle:
                    handle.write(f"world {world} {name} {what} "
                                 f"{time.perf_counter() - clock:.1f}\n")
        merged = root / "checkpoints" / name
        marker = root / f"saved-{name}.pt"
        if save:
            loop = _loop(stage, precision, rank, world, train_path)
            mark("built")
            for batch in batches[:TRAIN_STEPS]:
                # Augmented, so that the restored call count is one to check.
                images, targets = loop.augment(*_part(batch, rank, world))
                loop.train_step(None, images, targets)
            loop.epoch = 1
            mine = root / "ranks" / name / f"rank{rank}"
            loop.save(mine)
            dist.barrier()
            if rank == 0:
                for r in range(world):
                    shutil.copytree(root / "ranks" / name / f"rank{r}", merged,
                                    dirs_exist_ok=True)
            saved = _gathered(loop)
            if rank == 0:
                partial = marker.with_suffix(".partial")
                torch.save(saved, partial)
                partial.replace(marker)  # the other jobs start on this
            mark("saved")
            del loop
        loop = _loop(stage, precision, rank, world, train_path)
        fresh = _gathered(loop)
        _wait_for(marker)
        mark("waited")
        lines: list[str] = []
        loop.load(merged, say=lines.append)
        restored = _gathered(loop)
        _step(loop, batches[TRAIN_STEPS], rank, world)
        stepped = _gathered(loop)
        mark("stepped")
        if rank == 0:
            torch.save({"fresh": fresh, "restored": restored, "stepped": stepped,
                        "lines": lines}, root / f"world{world}-{name}.pt")
        del loop
    if world == 1:
        # A checkpoint written before the portable file existed: at another size, one line.
        name, stage, precision = VARIANTS[0]
        old = root / "without-portable"
        shutil.copytree(root / "checkpoints" / name, old)
        (old / PORTABLE_FILE).unlink()
        loop = _loop(stage, precision, rank, world, train_path)
        try:
            loop.load(old)
            message = None
        except UserError as exc:
            message = str(exc)
        (root / "without-portable.json").write_text(json.dumps({"message": message,
                                                                "folder": str(old)}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from raytrain_at.training.launch import prepare_data

    storage, out = tmp_path_factory.mktemp("storage"), tmp_path_factory.mktemp("portable")
    start = time.perf_counter()
    train_path, _ = prepare_data(_config(1, "fp32", 1), storage)
    (out / "train_path").write_text(train_path)
    print(f"prepare_data took {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    spawn_ranks(_worker, out, sum(world for world, _ in JOBS), timeout_s=300)
    print(f"the 6 ranks took {time.perf_counter() - start:.1f} s:\n"
          + (out / "timings.txt").read_text())
    return {"out": out,
            "saved": {name: torch.load(out / f"saved-{name}.pt", weights_only=True)
                      for name, _, _ in VARIANTS},
            "worlds": {(world, name): torch.load(out / f"world{world}-{name}.pt",
                                                 weights_only=True)
                       for world in (1, 2, 3) for name, _, _ in VARIANTS}}


def _differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (tensors: dtype, shape and every value)."""
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            same = (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x, y))
        else:
            same = x == y
        if not same:
            bad.append(key)
    return bad


@pytest.mark.parametrize("world", (1, 2, 3))
@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_a_2_worker_checkpoint_restores_exactly_at_any_world_size(runs, world, variant) -> None:
    saved = runs["saved"][variant]
    got = runs["worlds"][(world, variant)]
    expected_type = "BF16_Optimizer" if variant == "zero1-bf16" else "DeepSpeedZeroOptimizer"
    assert saved["optimizer_type"] == expected_type
    # The saved state is a trained one a freshly built loop does not have.
    assert saved["global_steps"] == TRAIN_STEPS and saved["step/0"] == TRAIN_STEPS
    assert saved["augment_calls"] == TRAIN_STEPS and saved["epoch"] == 1
    fresh = _differences(saved, got["fresh"])
    for prefix in ("master/", "exp_avg/", "exp_avg_sq/", "weight/", "ema/", "step/", "lr/"):
        assert any(key.startswith(prefix) for key in fresh), f"fresh loop already has {prefix}"
    assert _differences(saved, got["restored"]) == []
    if world == SAVED_WORLD:
        assert got["lines"] == []  # DeepSpeed's own shards, as before
    else:
        assert got["lines"] == [f"resuming a 2-worker checkpoint on {world} worker"
                                f"{'' if world == 1 else 's'}: optimizer state re-partitioned"]


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_the_next_step_gives_the_same_weights_at_every_world_size(runs, variant) -> None:
    precision = next(p for name, _, p in VARIANTS if name == variant)
    saved = runs["saved"][variant]
    base = runs["worlds"][(SAVED_WORLD, variant)]["stepped"]
    moved = max((base[k] - saved[k]).abs().max().item() for k in saved if k.startswith("master/"))
    assert moved > 1e-3, "the extra step did not move the weights"
    for world in (1, 3):
        other = runs["worlds"][(world, variant)]["stepped"]
        assert other["global_steps"] == base["global_steps"] == TRAIN_STEPS + 1
        assert other["step/0"] == base["step/0"] == TRAIN_STEPS + 1
        assert other["lr/0"] == base["lr/0"]
        for prefix in ("master/", "exp_avg/", "exp_avg_sq/", "ema/"):
            keys = [k for k in base if k.startswith(prefix)]
            diff = max((other[k].float() - base[k].float()).abs().max().item() for k in keys)
            print(f"{variant} world {world} vs {SAVED_WORLD}: max |{prefix}| diff {diff:.3g}")
            tolerance = STEP_TOLERANCE[precision]
            assert diff < tolerance.get(prefix, tolerance[""]), (variant, world, prefix, diff)


def test_the_manifest_catches_a_truncated_portable_state(runs, tmp_path) -> None:
    from raytrain_at.training.checkpoint_manifest import checkpoint_problem
    from raytrain_at.training.portable_state import PORTABLE_FILE

    copy = tmp_path / "checkpoint"
    shutil.copytree(runs["out"] / "checkpoints" / "zero1", copy)
    assert checkpoint_problem(copy) is None
    path = copy / PORTABLE_FILE
    path.write_bytes(path.read_bytes()[:-100])
    problem = checkpoint_problem(copy)
    assert problem is not None and problem.startswith(f"{PORTABLE_FILE} is ")


def test_an_older_checkpoint_at_another_size_says_which_size_resumes_it(runs) -> None:
    record = json.loads((runs["out"] / "without-portable.json").read_text())
    assert record["message"] == (
        f"the checkpoint {record['folder']} was written by 2 workers without "
        "portable_state.safetensors, so its ZeRO optimiser state loads only into 2 workers: "
        "resume it with --num-workers 2")
