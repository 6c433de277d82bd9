"""Conv weights stay channels_last under DeepSpeed ZeRO-1/2, and the updates are not scrambled.

:func:`raytrain_at.training.memory_format.keep_channels_last` stores each conv weight as an
(out, kh, kw, in) parameter read through a permuted view. The fast tests check, without
DeepSpeed, that the model computes the same, that its state dict keeps the plain keys, order and
NCHW shapes (so model files and DeepSpeed's module checkpoints do not change), that a plain
state dict loads back, and that timm's EMA, which lerps into state-dict tensors in place, still
moves the stored weights.

The slow test spawns one CPU rank (gloo) that builds the real engine
(:func:`raytrain_at.training.engine.build_engine`) at ZeRO stages 1 and 2 in fp32 and bf16 (ZeRO-1
+ bf16 is DeepSpeed's BF16_Optimizer), with and without ``keep_channels_last``, from the same
seed, and takes two steps on the same batches. Every conv weight must read back channels_last
after ``initialize`` and after each step (DeepSpeed re-points plain parameters at NCHW views of
its flat buffer; a ``.to(memory_format=torch.channels_last)`` model does not even get through
``initialize``: its broadcast views each weight as bytes, which needs stride 1 in the last
dimension), and the weights after two steps must equal the
plain run's: an update of an element with another element's gradient would move them apart by
about the learning rate. A checkpoint written by the channels_last engine loads into a fresh one
with the same weights, and both then take the same third step.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from raytrain_at.training.memory_format import (channels_last_weights, conv_weights,
                                                keep_channels_last)
from tests.support.gloo_ranks import rank_environment, spawn_ranks, tiny_convnext_cvst

CASES = ((1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16"))
BATCH = 8
STEPS = 2


def _channels_last(model: Any) -> bool:
    weights = conv_weights(model)
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last)
                                 for w in weights.values())


def test_state_dict_keeps_keys_order_and_shapes() -> None:
    plain, converted = tiny_convnext_cvst(), keep_channels_last(tiny_convnext_cvst())
    assert len(channels_last_weights(converted)) == len(conv_weights(converted)) > 0
    assert _channels_last(converted) and not _channels_last(plain)
    before, after = plain.state_dict(), converted.state_dict()
    assert list(after) == list(before)
    for key, tensor in before.items():
        assert after[key].shape == tensor.shape, key
        assert torch.equal(after[key], tensor), key
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(converted(x), plain(x), rtol=1e-5, atol=1e-6)


def test_plain_state_dict_loads_into_the_stored_layout() -> None:
    converted = keep_channels_last(tiny_convnext_cvst())
    torch.manual_seed(7)
    other = tiny_convnext_cvst().state_dict()
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in other.items()}
    converted.load_state_dict(other)  # strict: the plain keys and shapes
    for key, tensor in converted.state_dict().items():
        assert torch.equal(tensor, other[key]), key
    assert _channels_last(converted)


def test_ema_moves_the_stored_weights() -> None:
    from timm.utils.model_ema import ModelEmaV3

    model = keep_channels_last(tiny_convnext_cvst())
    ema = ModelEmaV3(model, decay=0.5, dtype=torch.float32)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update(model)
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point() and key.endswith("weight") and value.ndim == 4:
            torch.testing.assert_close(value, start[key] + 0.5)
    assert _channels_last(ema.module)


def _config(stage: int, precision: str):
    from raytrain_at.config import load_config

    return load_config("quickstart", [f"optim.zero_stage={stage}", "optim.grad_clip=null",
                                      f"scaling.precision={precision}",
                                      f"schedule.global_batch_size={BATCH}",
                                      "scaling.num_workers=1"])


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    return [(torch.rand(BATCH, 3, 32, 32, generator=gen),
             torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(STEPS + 1)]


def _step(engine, x: torch.Tensor, y: torch.Tensor) -> None:
    # As WorkerLoop runs a step: bf16 weights under bf16 autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine.bfloat16_enabled()):
        loss = F.cross_entropy(engine(x), y)
    engine.backward(loss)
    engine.step()


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """The one rank: every case with and without channels_last; writes ``rank0.pt``."""
    rank_environment(rank, 1, port)
    try:
        import deepspeed

        from raytrain_at.training.engine import build_engine

        deepspeed.init_distributed(dist_backend="gloo")
        batches = _batches()
        results = {}
        for stage, precision in CASES:
            config = _config(stage, precision)
            runs = {}
            for layout in ("plain", "channels_last"):
                model = tiny_convnext_cvst()
                if layout == "channels_last":
                    model = keep_channels_last(model)
                engine, optimizer, _ = build_engine(model, config, 4, torch.device("cpu"))
                strides = [_channels_last(engine.module)]
                for x, y in batches[:STEPS]:
                    _step(engine, x, y)
                    strides.append(_channels_last(engine.module))
                runs[layout] = {"strides": strides, "weights": _weights(engine.module),
                                "optimizer": type(optimizer).__name__}
                if layout == "channels_last":
                    ckpt = Path(out_dir, f"ckpt-{stage}-{precision}")
                    engine.save_checkpoint(str(ckpt), tag="t")
                    _step(engine, *batches[STEPS])
                    fresh, _, _ = build_engine(keep_channels_last(tiny_convnext_cvst()), config,
                                               4, torch.device("cpu"))
                    fresh.load_checkpoint(str(ckpt), tag="t", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
                    loaded = _weights(fresh.module)
                    _step(fresh, *batches[STEPS])
                    runs[layout].update(loaded=loaded, third=_weights(engine.module),
                                        fresh_third=_weights(fresh.module),
                                        fresh_strides=_channels_last(fresh.module))
            results[(stage, precision)] = runs
        torch.save(results, Path(out_dir, "rank0.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds-channels-last")
    spawn_ranks(_worker, out, 1)
    return torch.load(out / "rank0.pt")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision"), CASES)
def test_zero_keeps_channels_last_and_updates(runs, stage: int, precision: str) -> None:
    plain, kept = runs[(stage, precision)]["plain"], runs[(stage, precision)]["channels_last"]
    if (stage, precision) == (1, "bf16"):
        assert kept["optimizer"] == "BF16_Optimizer"
    assert kept["strides"] == [True] * (STEPS + 1)
    # Same updates: the weights after two steps agree to the arithmetic's rounding. A scrambled
    # update is off by about the learning rate (1e-3) on most elements.
    initial = _weights(tiny_convnext_cvst())
    moved = _max_diff(plain["weights"], initial)
    diff = _max_diff(kept["weights"], plain["weights"])
    print(f"ZeRO-{stage} {precision}: max |channels_last - plain| = {diff:.3g} "
          f"(largest move {moved:.3g})")
    assert moved > 1e-3
    # Exact on the CPU (bf16 too): the layout changes where each number lives, not the arithmetic.
    assert diff == 0.0
    # The checkpoint restores the weights exactly, and the next step is the same.
    assert _max_diff(kept["loaded"], kept["weights"]) == 0.0
    assert _max_diff(kept["fresh_third"], kept["third"]) == 0.0
    assert kept["fresh_strides"] is True
