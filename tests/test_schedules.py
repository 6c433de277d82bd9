"""Schedules and the recipe values that feed them, checked against the papers' numbers.

Each test here fails on a one-line slip in the plumbing: Epsilon-Scheduling's slope, the LR warm-up
length or peak, the EMA decay or label smoothing read from the config.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from raytrain_at.config import load_config
from raytrain_at.training.engine import build_ema, build_optimizer, build_scheduler
from raytrain_at.training.loop import WorkerLoop
from raytrain_at.training.schedules import radius_factor


@pytest.mark.parametrize("epoch, expected", [(0, 0.0), (11, 0.0), (12, 0.0), (24, 12 / 25),
                                             (37, 1.0), (49, 1.0)])
def test_epsilon_scheduling_t1_12_t2_37_of_50(epoch: int, expected: float) -> None:
    """Epsilon-Scheduling (second paper): 0 before T1, linear from T1 to T2, then the target."""
    got = radius_factor(float(epoch), schedule="epsilon_scheduling", t1=12, t2=37)
    assert got == pytest.approx(expected, abs=1e-12)


def test_the_loop_attacks_at_the_scheduled_radius() -> None:
    config = load_config("quickstart", ["attack.eps_schedule=epsilon_scheduling",
                                        "attack.eps_t1=12", "attack.eps_t2=37",
                                        "schedule.epochs=50"])
    holder = SimpleNamespace(config=config)
    eps = config.attack.eps
    assert WorkerLoop.current_eps(holder, 11.0) == 0.0
    assert WorkerLoop.current_eps(holder, 24.0) == pytest.approx(eps * 12 / 25)
    assert WorkerLoop.current_eps(holder, 40.0) == pytest.approx(eps)
    linear = load_config("quickstart", ["attack.eps_schedule=linear", "attack.eps_t2=10"])
    assert WorkerLoop.current_eps(SimpleNamespace(config=linear), 5.0) == pytest.approx(
        linear.attack.eps / 2)


def _lrs(recipe: str, steps_per_epoch: int, steps: list[int]) -> list[float]:
    config = load_config(recipe)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return [seen[s] for s in steps]


def test_lr_of_the_300_epoch_recipe_follows_the_paper() -> None:
    """Table 2 ConvNeXt-T + ConvStem, 300 epochs: peak 1e-3 reached after 20 warm-up epochs
    (App. A.2), cosine to 1e-6 at the last step. 10 steps per epoch: 200 warm-up, 3000 in all."""
    first, last_warmup, after, last = _lrs("table2_convnext_tiny_cvst_300ep_2step", 10,
                                           [0, 199, 200, 2999])
    assert first == pytest.approx(1e-3 / 200)
    assert last_warmup == pytest.approx(1e-3)
    assert after == pytest.approx(1e-3)  # cosine starts at the peak
    expected_last = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 2799 / 2800))
    assert last == pytest.approx(expected_last, rel=1e-9)
    assert last < 1.01e-6


def test_lr_of_a_50_epoch_recipe_peaks_after_10_epochs() -> None:
    first, before_peak, peak = _lrs("table2_convnext_base_cvst_50ep_2step", 4, [0, 38, 39])
    assert first == pytest.approx(1e-3 / 40)
    assert before_peak == pytest.approx(1e-3 * 39 / 40)
    assert peak == pytest.approx(1e-3)


def test_ema_decay_is_the_configured_one_and_stays_fp32() -> None:
    """The update is ``decay * ema + (1 - decay) * live`` with the configured decay; a bf16
    live module still gets an fp32 average, started from the fp32 weights."""
    config = load_config("quickstart", ["optim.ema_decay=0.75"])
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2 ** -12)  # not representable in bf16
    ema = build_ema(model, config.optim.ema_decay)
    assert ema.module.weight.dtype == torch.float32
    assert torch.all(ema.module.weight == 1.0 + 2 ** -12)
    model.to(torch.bfloat16)  # as DeepSpeed casts the live module after the EMA is built
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert ema.module.weight.dtype == torch.float32
    expected = 0.75 * (1.0 + 2 ** -12) + 0.25 * 3.0
    assert torch.allclose(ema.module.weight, torch.full_like(ema.module.weight, expected),
                          rtol=0, atol=1e-7)
    assert build_ema(model, None) is None
    assert build_ema(torch.nn.Linear(2, 2).to(torch.bfloat16), 0.9).module.weight.dtype == \
        torch.float32


# 0.9999: the paper's code (timm ModelEmaV2) and Sec. 4.2; the appendix's 0.999 was the value
# before issue 27 (docs/training.md, "Values taken from the paper's code").
@pytest.mark.parametrize("recipe, decay", [("quickstart", 0.9),
                                           ("table2_convnext_tiny_cvst_300ep_2step", 0.9999)])
def test_recipes_carry_their_ema_decay(recipe: str, decay: float) -> None:
    assert load_config(recipe).optim.ema_decay == decay
    assert build_ema(torch.nn.Linear(2, 2), load_config(recipe).optim.ema_decay).decay == decay
