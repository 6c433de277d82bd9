"""The attack contract and the guard that keeps attacks from disturbing the model.

Contract (as AutoAttack's): ``Attack(model, ...)`` then ``attack.perturb(x, y) -> x_adv`` with
``x`` in [0, 1], ``y`` class indices (B,) or soft targets (B, C). ``x_adv`` is always inside the
threat model's ball around ``x`` and inside [0, 1]; the model's parameters, their ``.grad`` and
every module's train/eval flag are exactly as before the call. Gradients are taken with
``torch.autograd.grad`` with respect to the input only, so parameter gradients are never touched
(and with DeepSpeed no gradient hooks fire).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol
from collections.abc import Iterator

import torch
import torch.nn as nn

from raytrain_at.attacks.losses import hard_labels


class Attack(Protocol):
    """Anything with ``perturb(x, y) -> x_adv``."""

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run the block with the model in eval mode (the paper attacks in eval mode), then restore
    every module's own train/eval flag (not just the top-level one: frozen BN layers stay
    frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def check_inputs(x: torch.Tensor, y: torch.Tensor, check_range: bool = True) -> None:
    """Reject inputs outside the contract with a clear message (``check_range=False`` skips the
    [0, 1] check, the one part that reads a value back from the device)."""
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x has batch {tuple(x.shape)[:1]} but y has {tuple(y.shape)[:1]}")
    if check_range and x.numel():
        # One reduction, read back once per call: a queue stall on a GPU.
        low, high = torch.aminmax(x)
        low, high = float(low), float(high)
        if low < 0 or high > 1:
            raise ValueError("attacks take images in [0, 1]; got values outside that range "
                             f"[{low:.3f}, {high:.3f}]")


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor,
                                                                          torch.Tensor,
                                                                          torch.Tensor]:
    """Per-sample loss, logits and the gradient of the summed loss with respect to ``x`` only."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits)
        (grad,) = torch.autograd.grad(loss.sum(), [x])
    return loss.detach(), logits.detach(), grad.detach()


def input_loss(model: nn.Module, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and logits at ``x`` without a gradient (a forward pass only)."""
    with torch.no_grad():
        logits = model(x.detach())
        return loss_fn(logits).detach(), logits.detach()


def predictions_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1) == hard_labels(y)
