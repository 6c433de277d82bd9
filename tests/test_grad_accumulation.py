"""bf16 runs accumulate and all-reduce gradients in fp32, and their checkpoints restore exactly.

Two spawned CPU ranks (gloo) build the real engine
(:func:`raytrain_at.training.engine.build_engine`) with ``scaling.precision=bf16`` at ZeRO stages
1 and 2, and each runs one backward on its own micro-batch: the all-reduce sums the two ranks'
bf16 gradients. Each rank records the gradient partition DeepSpeed hands the torch AdamW at the
step (the tensors the update is computed from) and, from a copy of the model with the same bf16
weights, both micro-batches' bf16 gradients. The recorded partition must be their mean summed in
fp32; a sum in bf16 (what the all-reduce did before, without ``data_types.grad_accum_dtype`` and
``communication_data_type``) is off by about 2^-9 of the largest gradient, far outside fp32's
rounding.

At stage 1 (the default) bf16 now steps through DeepSpeed's ``BF16_Optimizer`` instead of
``DeepSpeedZeroOptimizer``: a checkpoint it writes restores bit for bit (weights, fp32 master
partition, AdamW moments, LR schedule) and the next step is the same; a checkpoint written before
the change (by ``DeepSpeedZeroOptimizer``, same file names) restores bit for bit too.

One spawn runs everything (DeepSpeed's import and first ``initialize`` are the slow part; 40-70 s
on 2 cores, so those tests are ``slow``: ``pytest -m slow tests/test_grad_accumulation.py``); the
tests read its results. The fast suite keeps the config checks at the end.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.support.gloo_ranks import rank_environment, spawn_ranks, tiny_convnext_cvst


STAGES = (1, 2)
WORLD_SIZE = 2
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 4
# fp32 rounding of a two-term sum, relative to the largest gradient; a bf16 sum is ~2e-3 off.
FP32_TOLERANCE = 1e-6
BF16_GAP = 1e-4
EMA_DECAY = 0.5


def _config(stage: int):
    from raytrain_at.config import load_config

    return load_config("quickstart", [f"optim.zero_stage={stage}", "optim.grad_clip=null",
                                      "scaling.precision=bf16",
                                      f"schedule.global_batch_size={GLOBAL_BATCH}",
                                      f"scaling.num_workers={WORLD_SIZE}"])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return (torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen))


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as WorkerLoop runs a bf16 step
        return F.cross_entropy(model(x), y)


def _micro_batch_gradients(model: torch.nn.Module, parts: list[slice]
                           ) -> list[dict[str, torch.Tensor]]:
    """Each micro-batch's bf16 gradients of a copy of ``model`` with DeepSpeed's cast: bf16
    parameters, buffers (the pixel normalisation) left in fp32."""
    import copy

    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    x, y = _batch()
    grads = []
    for part in parts:
        reference.zero_grad()
        _loss(reference, x[part], y[part]).backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
    return grads


def _record_step_gradients(inner: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """Copies of the gradients ``inner`` steps from, by parameter id, at each of its steps (ZeRO
    steps one group at a time)."""
    seen: dict[int, torch.Tensor] = {}
    step = inner.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        seen.update({id(p): p.grad.detach().clone() for group in inner.param_groups
                     for p in group["params"] if p.grad is not None})
        return step(*args, **kwargs)

    inner.step = recording_step  # type: ignore[method-assign]
    return seen


def _gradient_check(rank: int, stage: int) -> tuple[dict[str, Any], Any, Any]:
    """One bf16 step at ``stage``; the recorded partition against the fp32 and bf16 sums."""
    from raytrain_at.training.engine import build_ema, build_engine, build_optimizer

    config = _config(stage)
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    parts = [slice(r * per_rank, (r + 1) * per_rank) for r in range(WORLD_SIZE)]
    model = tiny_convnext_cvst()
    grads = _micro_batch_gradients(model, parts)
    names = {id(p): n for n, p in model.named_parameters()}
    # The groups build_engine hands DeepSpeed, in its order, by parameter name.
    groups = [[names[id(p)] for p in g["params"]]
              for g in build_optimizer(model, config).param_groups]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = build_ema(model, EMA_DECAY)  # as WorkerLoop: from the fp32 weights, before the cast
    assert ema is not None
    engine, optimizer, _ = build_engine(model, config, STEPS_PER_EPOCH, torch.device("cpu"))
    inner = optimizer.optimizer
    seen = _record_step_gradients(inner)
    x, y = _batch()
    engine.backward(_loss(engine, x[parts[rank]], y[parts[rank]]))
    engine.step()
    ema.update(engine.module)
    # The EMA follows the weights the new optimiser wrote back into the bf16 module.
    stepped = dict(engine.module.named_parameters())
    ema_error = max((ema_value - (EMA_DECAY * initial[n] + (1 - EMA_DECAY)
                                  * stepped[n].detach().float())).abs().max().item()
                    for n, ema_value in ema.module.named_parameters())
    ema_moved = max((ema_value - initial[n]).abs().max().item()
                    for n, ema_value in ema.module.named_parameters())
    fp32_error = bf16_error = largest = 0.0
    dtypes = set()
    assert len(inner.param_groups) == len(groups)
    for group, group_names in zip(inner.param_groups, groups, strict=True):
        (partition,) = group["params"]  # one flat fp32 partition per group
        got = seen[id(partition)]
        dtypes.add(str(got.dtype))
        fp32_sum = torch.cat([((grads[0][n].float() + grads[1][n].float()) / WORLD_SIZE)
                              .reshape(-1) for n in group_names])
        bf16_sum = torch.cat([((grads[0][n] + grads[1][n]) / WORLD_SIZE).float().reshape(-1)
                              for n in group_names])
        start = rank * partition.numel()  # this rank's slice of the group (padding at the end)
        want, bf16 = fp32_sum[start:start + got.numel()], bf16_sum[start:start + got.numel()]
        got = got[:want.numel()]
        fp32_error = max(fp32_error, (got - want).abs().max().item())
        bf16_error = max(bf16_error, (got - bf16).abs().max().item())
        largest = max(largest, fp32_sum.abs().max().item())
    result = {"optimizer": type(optimizer).__name__, "dtypes": sorted(dtypes),
              "fp32_error": fp32_error, "bf16_error": bf16_error, "largest": largest,
              "ema_dtypes": sorted({str(v.dtype) for v in ema.module.parameters()}),
              "ema_error": ema_error, "ema_moved": ema_moved}
    return result, engine, optimizer


def _state(engine, optimizer) -> dict[str, list[torch.Tensor]]:
    inner = optimizer.optimizer
    return {"weights": [p.detach().clone() for p in engine.module.parameters()],
            "master": [p.detach().clone() for g in inner.param_groups for p in g["params"]],
            "moments": [v.detach().clone() for s in inner.state.values() for v in s.values()],
            "schedule": [torch.tensor(float(engine.lr_scheduler.last_epoch))]}


def _differing(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> list[str]:
    """The parts of two states that are not bit for bit equal."""
    return [key for key in a if len(a[key]) != len(b[key])
            or not all(torch.equal(s, t) for s, t in zip(a[key], b[key]))]


def _previous(deepspeed_config):
    """The DeepSpeed config of before fp32 accumulation (bf16 gradients throughout)."""

    def previous_deepspeed_config(config, precision: str) -> dict[str, Any]:
        settings = deepspeed_config(config, precision)
        settings.pop("data_types", None)
        settings.pop("communication_data_type", None)
        return settings

    return previous_deepspeed_config


def _restore_checks(rank: int, engine, optimizer, out_dir: str) -> dict[str, Any]:
    """Save the stepped stage-1 engine; restore it (and one written before the change) into
    fresh engines."""
    import torch.distributed as dist

    from raytrain_at.training import engine as engine_module

    config = _config(1)
    x, y = _batch()
    part = slice(rank * (GLOBAL_BATCH // WORLD_SIZE), (rank + 1) * (GLOBAL_BATCH // WORLD_SIZE))
    written = {"current": str(Path(out_dir, "current"))}
    engine.save_checkpoint(written["current"], tag="t")
    saved = {"current": _state(engine, optimizer)}
    # The same step written by the engine of before the change.
    current_config = engine_module.deepspeed_config
    engine_module.deepspeed_config = _previous(current_config)
    try:
        old, old_optimizer, _ = engine_module.build_engine(
            tiny_convnext_cvst(), config, STEPS_PER_EPOCH, torch.device("cpu"))
    finally:
        engine_module.deepspeed_config = current_config
    old.backward(_loss(old, x[part], y[part]))
    old.step()
    written["previous"] = str(Path(out_dir, "previous"))
    old.save_checkpoint(written["previous"], tag="t")
    saved["previous"] = _state(old, old_optimizer)
    dist.barrier()
    result: dict[str, Any] = {"previous_optimizer": type(old_optimizer).__name__}
    for name, directory in written.items():
        fresh, fresh_optimizer, _ = engine_module.build_engine(
            tiny_convnext_cvst(), config, STEPS_PER_EPOCH, torch.device("cpu"))
        result[f"{name}_fresh_differs"] = _differing(saved[name], _state(fresh, fresh_optimizer))
        path, _ = fresh.load_checkpoint(directory, tag="t", load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
        result[f"{name}_loaded"] = path is not None
        result[f"{name}_restored_differs"] = _differing(saved[name],
                                                        _state(fresh, fresh_optimizer))
        if name == "current":  # the next step of the restored engine is the saved one's
            for each in (engine, fresh):
                each.backward(_loss(each, x[part], y[part]))
                each.step()
            result["continued_differs"] = _differing(_state(engine, optimizer),
                                                     _state(fresh, fresh_optimizer))
            result["continued_moved"] = _differing(saved[name], _state(fresh, fresh_optimizer))
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank; writes ``rank{r}.json`` (or ``rank{r}.err``)."""
    rank_environment(rank, WORLD_SIZE, port)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        results: dict[str, Any] = {}
        for stage in STAGES:
            results[str(stage)], engine, optimizer = _gradient_check(rank, stage)
            if stage == 1:
                results["restore"] = _restore_checks(rank, engine, optimizer, out_dir)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("grad-accum")
    spawn_ranks(_worker, out, WORLD_SIZE)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.slow  # one 2-rank DeepSpeed spawn: 40-70 s on 2 cores
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_gradients_are_summed_over_ranks_in_fp32(ranks, stage: int) -> None:
    for rank, run in enumerate(ranks):
        got = run[str(stage)]
        assert got["optimizer"] == ("BF16_Optimizer" if stage == 1 else "DeepSpeedZeroOptimizer")
        assert got["dtypes"] == ["torch.float32"]
        print(f"stage {stage} rank {rank}: |step grad - fp32 sum| = {got['fp32_error']:.3g}, "
              f"|step grad - bf16 sum| = {got['bf16_error']:.3g}, largest {got['largest']:.3g}")
        # A bf16 sum is visibly different here, so matching the fp32 sum says something.
        assert got["bf16_error"] > BF16_GAP * got["largest"]
        assert got["fp32_error"] <= FP32_TOLERANCE * got["largest"], (
            f"stage {stage} rank {rank}: the gradients DeepSpeed steps from are not an fp32 sum")


@pytest.mark.slow  # one 2-rank DeepSpeed spawn: 40-70 s on 2 cores
@pytest.mark.parametrize("stage", STAGES)
def test_fp32_ema_follows_the_stepped_bf16_weights(ranks, stage: int) -> None:
    for run in ranks:
        got = run[str(stage)]
        assert got["ema_dtypes"] == ["torch.float32"]
        assert got["ema_moved"] > 1e-5  # the weights the EMA takes in moved
        assert got["ema_error"] < 1e-6, "the EMA is not decay * start + (1 - decay) * weights"


@pytest.mark.slow  # one 2-rank DeepSpeed spawn: 40-70 s on 2 cores
def test_bf16_optimizer_checkpoint_restores_exactly(ranks) -> None:
    for run in ranks:
        got = run["restore"]
        assert got["current_loaded"]
        # A fresh engine differs in every part, so the equality after the load means something.
        assert got["current_fresh_differs"] == ["weights", "master", "moments", "schedule"]
        assert got["current_restored_differs"] == []
        assert got["continued_moved"] == ["weights", "master", "moments", "schedule"]
        assert got["continued_differs"] == []


@pytest.mark.slow  # one 2-rank DeepSpeed spawn: 40-70 s on 2 cores
def test_checkpoint_written_before_fp32_accumulation_resumes(ranks) -> None:
    for run in ranks:
        got = run["restore"]
        assert got["previous_optimizer"] == "DeepSpeedZeroOptimizer"
        assert got["previous_loaded"]
        assert got["previous_fresh_differs"] == ["weights", "master", "moments", "schedule"]
        assert got["previous_restored_differs"] == []


@pytest.mark.parametrize("overrides", [["scaling.precision=bf16"], ["scaling.use_gpu=true"]])
def test_zero_stage_0_is_refused_where_the_workers_run_bf16(overrides: list[str]) -> None:
    from raytrain_at.config import load_config
    from raytrain_at.errors import UserError

    with pytest.raises(UserError, match=r"^optim\.zero_stage 0 cannot accumulate bf16") as info:
        load_config("quickstart", ["optim.zero_stage=0", *overrides])
    assert "\n" not in str(info.value)
    # fp32 workers keep stage 0, and bf16 ones stages 1 and 2.
    assert load_config("quickstart", ["optim.zero_stage=0"]).optim.zero_stage == 0
    for stage in (1, 2):
        assert load_config("quickstart", [f"optim.zero_stage={stage}", *overrides])


def test_engine_refuses_zero_stage_0_when_auto_resolves_to_bf16() -> None:
    from raytrain_at.config import load_config
    from raytrain_at.errors import UserError
    from raytrain_at.training.engine import deepspeed_config

    # A stage-0 config valid for CPU workers that a device resolves to bf16 (e.g. the benchmark).
    config = load_config("quickstart", ["optim.zero_stage=0"])
    with pytest.raises(UserError, match=r"^optim\.zero_stage 0 cannot accumulate bf16"):
        deepspeed_config(config, "bf16")
    settings = deepspeed_config(config, "fp32")
    assert settings["zero_optimization"] == {"stage": 0}
    # The two settings the (slow) 2-rank test shows at work, guarded in the fast suite too.
    assert settings["data_types"] == {"grad_accum_dtype": "fp32"}
    assert settings["communication_data_type"] == "fp32"
