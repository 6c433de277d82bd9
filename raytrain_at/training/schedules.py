"""Schedules as pure functions of training progress: learning rate per step, radius per epoch.

* Learning rate (paper App. A.1): linear warm-up from 0 to the peak over ``warmup_epochs``, then
  cosine decay to ``min_lr`` at the last step; evaluated per optimiser step.
* Radius: ``fixed``; ``linear`` warm-up from 0 to ``eps`` over the first ``eps_t2`` epochs; or
  Epsilon-Scheduling (second paper's group): ``alpha(t) = 0`` before ``T1``, linear between ``T1``
  and ``T2``, 1 after, times the target radius.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float,
              min_lr: float, schedule: str = "cosine") -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    ``schedule``: ``cosine`` (decay to ``min_lr`` after the warm-up) or ``constant`` (the peak).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    floor = min_lr / peak_lr if peak_lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def radius_factor(epoch: float, *, schedule: str, t1: float, t2: float) -> float:
    """Fraction of the target radius at (fractional) ``epoch``."""
    if schedule == "fixed":
        return 1.0
    if schedule == "linear":
        t1 = 0.0
    elif schedule != "epsilon_scheduling":
        raise ValueError(f"unknown radius schedule {schedule!r}")
    if epoch < t1:
        return 0.0
    if epoch >= t2:
        return 1.0
    return (epoch - t1) / (t2 - t1)
