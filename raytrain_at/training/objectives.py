"""Training objectives as one pure function: (model, attack, batch, config) -> loss and metrics.

:func:`training_step_loss` is the loss half of the training step: ``WorkerLoop.train_step``
(:mod:`raytrain_at.training.loop`, the one step the loop, the docs and the speed benchmark run)
calls it, then lets DeepSpeed backpropagate and step. No Ray, MLflow, DeepSpeed or globals here,
so the adversarial step's loss is testable on its own.

Objectives:

* ``adversarial``: cross-entropy on the attack's points (Madry et al.), label smoothing on hard
  labels, soft targets (MixUp/CutMix, already smoothed) used as they are;
* ``trades``: CE on the clean input + ``beta`` * KL(p_clean || p_adv) (Zhang et al. 2019; beta = 1
  in the robust fine-tuning benchmark), with the attack's points as x_adv;
* ``clean``: CE on the clean input (the ConvStem models' clean pre-training, App. B.3).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class StepLoss:
    """One batch's objective: what the step backpropagates and what it reports.

    Attributes:
        loss: scalar with graph, to backpropagate.
        logits: the model's outputs on the points trained on.
        x_adv: the attack's points (the clean images for ``clean``), detached.
        accuracy: detached scalar, accuracy on the points trained on.

    Metrics stay device tensors so the caller chooses when to synchronise with the host.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    x_adv: torch.Tensor
    accuracy: torch.Tensor


def _attack_points(attack: Attack | None, images: torch.Tensor, targets: torch.Tensor,
                   config: ObjectiveSection) -> torch.Tensor:
    """The points the objective trains on: the attack's (detached), or the images for ``clean``."""
    if config.kind == "clean":
        return images
    if attack is None:
        raise ValueError(f"objective {config.kind!r} needs an attack")
    return attack.perturb(images, targets).detach()


def _objective_loss(model: nn.Module, images: torch.Tensor, x_adv: torch.Tensor,
                    targets: torch.Tensor, config: ObjectiveSection) -> StepLoss:
    """The loss of one batch given the attack's points ``x_adv`` (see :func:`_attack_points`)."""
    labels = hard_labels(targets)
    if config.kind == "trades":
        # One forward of clean and adversarial together: BatchNorm sees both, as in TRADES.
        both = model(torch.cat([images, x_adv])).float()
        clean_logits, logits = both[: images.shape[0]], both[images.shape[0]:]
        natural = _soft_or_smoothed_ce(clean_logits, targets, config.label_smoothing)
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(clean_logits, dim=1),
                      reduction="batchmean")
        loss = natural + config.trades_beta * kl
    else:  # adversarial (x_adv are the attack's points) or clean (x_adv are the images)
        logits = model(x_adv)
        loss = _soft_or_smoothed_ce(logits, targets, config.label_smoothing)
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    return StepLoss(loss=loss, logits=logits, x_adv=x_adv, accuracy=accuracy)


def training_step_loss(model: nn.Module, attack: Attack | None, images: torch.Tensor,
                       targets: torch.Tensor, config: ObjectiveSection) -> StepLoss:
    """Compute the training loss of one batch: the attack, then the objective on its points.

    The pure unit of the training step (``WorkerLoop.train_step`` calls it under its autocast,
    then backpropagates ``loss``).

    Args:
        model: the classifier in train mode, taking [0, 1] images.
        attack: the inner maximisation (e.g. ``APGD.for_training``); ignored for ``clean``.
        images: (B, C, H, W) in [0, 1].
        targets: (B,) class indices or (B, K) soft targets.
        config: the run config's ``objective`` section.

    Returns:
        The loss with its graph, the logits, the attack's points and detached metrics.
    """
    x_adv = _attack_points(attack, images, targets, config)  # model in eval mode inside
    return _objective_loss(model, images, x_adv, targets, config)
