"""Checkpoint selection: keep the weights of the best held-out epoch, as the paper does.

The paper picks the most robust checkpoint post hoc on 4k held-out ImageNet training images, never
on the test set (App. A.1): held-out robust accuracy under APGD-CE (1 step for 'small' models, 10
for 'medium' and 'large', ``attack.heldout_steps``) for adversarial runs, held-out clean accuracy
for clean pre-training. Rank 0 keeps a host copy of the best epoch's evaluated (EMA) weights, so
that every checkpoint carries the selection so far and a resumed run continues it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from raytrain_at.config import RunConfig

ROBUST = "heldout_robust_accuracy"
CLEAN = "heldout_clean_accuracy"
# Reported with every epoch's metrics: the epoch selected so far and its score, as
# ``selected_<metric>`` (e.g. ``selected_heldout_robust_accuracy``).
EPOCH_KEY = "selected_epoch"


def selection_metric(config: RunConfig) -> str:
    """The held-out metric that selects a run's checkpoint (``schedule.select_by``)."""
    choice = config.schedule.select_by
    if choice == "auto":
        return CLEAN if config.objective.kind == "clean" else ROBUST
    return CLEAN if choice == "clean" else ROBUST


def selection_description(config: RunConfig, has_heldout: bool) -> str:
    """One line saying what selects the checkpoint, e.g. for MLflow tags and model files."""
    metric = selection_metric(config)
    if not has_heldout:
        return "final epoch (no held-out data)"
    if metric == CLEAN:
        return f"max {CLEAN}"
    a = config.attack
    return (f"max {ROBUST} (APGD-CE {a.heldout_steps} step{'s' if a.heldout_steps > 1 else ''}, "
            f"{a.norm} eps {a.eps:.6g})")


@dataclass
class Selection:
    """The best epoch so far by ``metric`` and (rank 0) a host copy of its weights."""

    metric: str
    score: float | None = None
    epoch: int | None = None
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def consider(self, epoch: int, metrics: dict[str, float], module: nn.Module | None) -> bool:
        """Take ``epoch`` if its score beats the best (ties keep the earlier epoch).

        Without the metric (no held-out data) every epoch is taken: the final one is selected.
        ``module`` is copied to the host when taken (None on ranks that keep no weights).
        """
        score = metrics.get(self.metric)
        if score is not None and self.score is not None and not score > self.score:
            return False
        self.score, self.epoch = score, epoch
        if module is not None:
            self.weights = {k: v.detach().to("cpu", copy=True)
                            for k, v in module.state_dict().items()}
        return True

    def report(self) -> dict[str, float]:
        """What every epoch's report adds: the selection so far."""
        out: dict[str, float] = {}
        if self.epoch is not None:
            out[EPOCH_KEY] = float(self.epoch)
        if self.score is not None:
            out[f"selected_{self.metric}"] = float(self.score)
        return out

    def state(self) -> dict[str, float | int | None | str]:
        return {"metric": self.metric, "score": self.score, "epoch": self.epoch}

    def restore(self, state: dict, weights: dict[str, torch.Tensor] | None) -> None:
        self.score = state.get("score")
        self.epoch = state.get("epoch")
        self.weights = weights
