"""Checkpoint selection: keep the weights of the best held-out epoch, as the paper does.

The paper picks the most robust checkpoint post hoc on 4k held-out ImageNet training images, never
on the test set (App. A.1): held-out robust accuracy under APGD-CE (1 step for 'small' models, 10
for 'medium' and 'large', ``attack.heldout_steps``) for adversarial runs, held-out clean accuracy
for clean pre-training. Rank 0 keeps a host copy of the best epoch's evaluated (EMA) weights.

Those weights are written once, not into every checkpoint (a model-sized upload per epoch): the
selected epoch's own checkpoint holds them as its ``model.safetensors``; when that epoch was not
checkpointed, the next checkpoint adds them as ``selected.safetensors``. Every later checkpoint
records which checkpoint (by epoch) holds them, and its :func:`checkpoint_score` ranks the
holders above the others, so Ray Train's retention (the best two by score, and always the
latest) keeps the holder for as long as the selection stands; a resume reads the weights back
from it.
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
# Reported with each checkpoint, what Ray Train's retention ranks by (:func:`checkpoint_score`).
SCORE_KEY = "checkpoint_score"
# Above any epoch: a checkpoint holding the selected weights outranks every other one.
_HOLDER_BONUS = 1_000_000


def checkpoint_score(epoch: int, holds_selected: bool) -> float:
    """The retention score of the checkpoint of ``epoch``: the holders of selected weights
    first (newest first), then the rest by epoch. Ray Train keeps the best two by this score
    and always the latest, so the checkpoint holding the current selection is never deleted
    and a non-holder is deleted as soon as a newer checkpoint arrives."""
    return float(epoch + (_HOLDER_BONUS if holds_selected else 0))


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
    # Where a checkpoint holds ``weights``: (its epoch, its file); None until one does (a new
    # selection, or one restored from a checkpoint written before this record existed).
    stored_in: tuple[int, str] | None = None

    def consider(self, epoch: int, metrics: dict[str, float], module: nn.Module | None) -> bool:
        """Take ``epoch`` if its score beats the best (ties keep the earlier epoch).

        Without the metric (no held-out data) every epoch is taken: the final one is selected.
        ``module`` is copied to the host when taken (None on ranks that keep no weights).
        """
        score = metrics.get(self.metric)
        if score is not None and self.score is not None and not score > self.score:
            return False
        self.score, self.epoch, self.stored_in = score, epoch, None
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

    def file_for(self, epoch: int, model_file: str, selected_file: str) -> str | None:
        """Which file of the checkpoint of ``epoch`` must hold the selected weights: its model
        file when ``epoch`` is the selected one, ``selected_file`` when no checkpoint holds
        them yet, None when an earlier checkpoint does (nothing to write again)."""
        if self.epoch == epoch:
            return model_file
        return selected_file if self.stored_in is None else None

    def state(self) -> dict[str, float | int | None | str | list]:
        return {"metric": self.metric, "score": self.score, "epoch": self.epoch,
                "stored_in": list(self.stored_in) if self.stored_in is not None else None}

    def restore(self, state: dict, weights: dict[str, torch.Tensor] | None) -> None:
        self.score = state.get("score")
        self.epoch = state.get("epoch")
        stored = state.get("stored_in")
        self.stored_in = (int(stored[0]), str(stored[1])) if stored else None
        self.weights = weights
