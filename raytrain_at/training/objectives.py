"""Training objectives as one pure function: (model, attack, batch, config) -> loss and metrics.

No Ray, MLflow, DeepSpeed or globals here, so the adversarial step is testable on its own and the
same function runs in the Ray Train loop, the single-process benchmark and the tests.

Objectives:

* ``adversarial``: cross-entropy on the attack's points (Madry et al.), label smoothing on hard
  labels, soft targets (MixUp/CutMix, already smoothed) used as they are;
* ``trades``: CE on the clean input + ``beta`` * KL(p_clean || p_adv) (Zhang et al. 2019; beta = 1
  in the robust fine-tuning benchmark), with the attack's points as x_adv;
* ``clean``: CE on the clean input (the ConvStem models' clean pre-training, App. B.3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from raytrain_at.attacks.base import Attack
from raytrain_at.attacks.losses import hard_labels
from raytrain_at.config import ObjectiveSection


def _soft_or_smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, smoothing: float
                         ) -> torch.Tensor:
    logits = logits.float()
    if targets.dim() == 2:
        return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def training_step_loss(model: nn.Module, attack: Attack | None, images: torch.Tensor,
                       targets: torch.Tensor, config: ObjectiveSection) -> dict[str, Any]:
    """Compute the training loss of one batch.

    Args:
        model: the classifier in train mode, taking [0, 1] images.
        attack: the inner maximisation (e.g. ``APGD.for_training``); ignored for ``clean``.
        images: (B, C, H, W) in [0, 1].
        targets: (B,) class indices or (B, K) soft targets.
        config: the run config's ``objective`` section.

    Returns:
        ``loss`` (scalar with graph, to backpropagate), ``logits`` (on the points trained on),
        ``x_adv`` (the attack's points; the clean images for ``clean``), and ``metrics``: detached
        scalar tensors (``loss``, ``accuracy`` on the trained points, ``clean_accuracy`` for TRADES)
        so the caller chooses when to synchronise with the host.
    """
    if config.kind != "clean" and attack is None:
        raise ValueError(f"objective {config.kind!r} needs an attack")
    labels = hard_labels(targets)
    if config.kind == "clean":
        x_train = images
        logits = model(images)
        loss = _soft_or_smoothed_ce(logits, targets, config.label_smoothing)
        extra: dict[str, torch.Tensor] = {}
    else:
        x_train = attack.perturb(images, targets).detach()
        if config.kind == "adversarial":
            logits = model(x_train)
            loss = _soft_or_smoothed_ce(logits, targets, config.label_smoothing)
            extra = {}
        else:
            # One forward of clean and adversarial together: BatchNorm sees both, as in TRADES.
            both = model(torch.cat([images, x_train])).float()
            clean_logits, logits = both[: images.shape[0]], both[images.shape[0]:]
            natural = _soft_or_smoothed_ce(clean_logits, targets, config.label_smoothing)
            kl = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(clean_logits, dim=1),
                          reduction="batchmean")
            loss = natural + config.trades_beta * kl
            extra = {"clean_accuracy": (clean_logits.argmax(1) == labels).float().mean().detach(),
                     "kl": kl.detach()}
    metrics = {"loss": loss.detach(),
               "accuracy": (logits.detach().argmax(1) == labels).float().mean(), **extra}
    return {"loss": loss, "logits": logits, "x_adv": x_train, "metrics": metrics}
