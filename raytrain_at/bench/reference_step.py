"""The reference row of ``raytrain-at bench step``: the source paper's training step, plain torch.

The same 2-step APGD adversarial step written the way nmndeep/revisiting-at's ``main.py`` and
``autopgd_train_clean.py`` do it (read from the repository, not copied): fp16 autocast around
attack and training forward with ``torch.amp.GradScaler``, eager, plain ``torch.optim.AdamW`` (not
fused), timm ``ModelEmaV2(device='cpu')`` (its EMA lives in host memory, so every update copies the
weights off the GPU), model weights channels_last (its default ``misc.use_channel_last=1``) fed the
contiguous NCHW images its torch DataLoader gives (augmented there, on the CPU: no augmentation in
the step), and the pass structure of its ``apgd_train`` (l_inf, no random start): forward + input
gradient at the clean point, one step with forward + gradient, a last step with a forward only
("save one backward pass"), keeping the highest-loss point. The step-size checkpoints of
``apgd_train`` are elementwise bookkeeping without model passes and are left out: an approximation
that keeps the cost, not the exact iterates. ``attack="ours"`` runs the project's
``APGD.for_training`` inside the reference step instead, which separates the effect of the
attack's pass count from precision, layout, optimizer and EMA. On the CPU the reference runs in
fp32 (fp16 autocast and GradScaler need CUDA); its description says so.

Hyperparameters (radius, iterations, label smoothing, weight decay, betas, EMA decay) are the run
config's, the same as the project's row.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils.model_ema import ModelEmaV2

from raytrain_at.attacks import APGD, attack_mode
from raytrain_at.config import RunConfig


@dataclass
class Variant:
    """A ready-to-run training step on inputs of its own, and what it is made of."""

    step: Callable[[], None]
    passes: dict[str, int]  # model passes per image and step (see forward_equivalents)
    description: dict[str, str | bool | None]


def forward_equivalents(passes: dict[str, int]) -> int:
    """Forward-equivalents per image: a forward 1, a backward to the input only 1 (activation
    gradients, no weight gradients), a full backward 2."""
    return (passes["forward_only"] + 2 * passes["forward_input_backward"]
            + 3 * passes["forward_full_backward"])


def apgd_step_passes(n_iter: int, random_start: bool) -> dict[str, int]:
    """Passes of one adversarial step with an ``n_iter``-step APGD attack: an input gradient at
    the start and after every iteration but the last, a forward at the last iterate (a random
    start adds a forward of the clean point, which stays a candidate), then the training forward
    and backward (``tests/test_attacks_contract.py`` counts them on a real model)."""
    return {"forward_only": 1 + int(random_start), "forward_input_backward": n_iter,
            "forward_full_backward": 1}


def paper_apgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    n_iter: int) -> torch.Tensor:
    """The pass structure of the source paper's ``apgd_train`` (l_inf, no random start).

    Forward + input gradient at ``x``, then ``n_iter`` momentum steps of size 2 * eps; every step
    but the last is followed by forward + input gradient, the last by a forward only. Returns the
    highest-loss point seen, the clean input included. Runs in eval mode and restores the train
    flags, as the paper's wrapper does.
    """
    def project(z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0.0, 1.0)

    with attack_mode(model):
        x_cur = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x_cur), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), [x_cur])
        best_loss, x_best = loss.detach(), x_cur.detach()
        x_cur = x_prev = x_cur.detach()
        for i in range(n_iter):
            momentum = 1.0 if i == 0 else 0.75
            with torch.no_grad():
                z = project(x_cur + 2 * eps * grad.sign())
                x_new = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev))
            x_prev, x_cur = x_cur, x_new
            last = i == n_iter - 1
            # Like the reference, the forward-only last step still runs with autograd on (the
            # weights require grad), so it stores activations as the other forwards do.
            x_cur.requires_grad_(not last)
            loss = F.cross_entropy(model(x_cur), y, reduction="none")
            if not last:
                (grad,) = torch.autograd.grad(loss.sum(), [x_cur])
            loss, x_cur = loss.detach(), x_cur.detach()
            better = loss > best_loss
            x_best = torch.where(better.view(-1, 1, 1, 1), x_cur, x_best)
            best_loss = torch.where(better, loss, best_loss)
    return x_best


def build_reference(model: nn.Module, config: RunConfig, batch: int, device: torch.device,
                    attack_kind: str) -> Variant:
    """The paper-style step of ``model`` (fresh weights, in train mode) on a fixed random batch.

    Args:
        model: the network, on ``device``.
        config: radius, iterations, label smoothing, weight decay, betas and EMA decay.
        batch: images per step.
        device: where it runs.
        attack_kind: ``paper`` (its ``apgd_train`` passes) or ``ours`` (``APGD.for_training``).
    """
    cuda = device.type == "cuda"
    # The paper's default converts the weights to channels_last; its images stay NCHW.
    model = model.train().to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    betas = cast("tuple[float, float]", tuple(config.optim.betas))
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": config.optim.weight_decay}],
                                  lr=1e-4, betas=betas)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    ema = ModelEmaV2(model, decay=config.optim.ema_decay or 0.9999, device="cpu")
    autocast = torch.autocast(device.type, dtype=torch.float16) if cuda else nullcontext()
    eps, n_iter = config.attack.eps, config.attack.steps
    if attack_kind == "paper":
        def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return paper_apgd_linf(model, x, y, eps, n_iter)
    else:  # started from the clean input, as the paper's: the same passes
        attack = APGD.for_training(model, eps=eps, n_iter=n_iter).perturb
    passes = apgd_step_passes(n_iter, random_start=False)

    generator = torch.Generator().manual_seed(1)
    resolution = config.data.resolution
    images = torch.rand(batch, 3, resolution, resolution, generator=generator).to(device)
    labels = torch.randint(0, config.model.num_classes, (batch,), generator=generator).to(device)
    smoothing = config.objective.label_smoothing

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            x_adv = attack(images, labels)
            loss = F.cross_entropy(model(x_adv), labels, label_smoothing=smoothing)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)

    return Variant(step=step, passes=passes, description={
        "step": "paper-style reference (plain torch, raytrain_at.bench.reference_step)",
        "precision": "fp16 autocast + GradScaler" if cuda
        else "fp32 (fp16 autocast and GradScaler need CUDA: CPU fallback)",
        "channels_last": "weights only (paper default), NCHW images",
        "optimizer": "torch AdamW (not fused)", "ema": "timm ModelEmaV2 on the CPU (paper)",
        "augmentation": "none in the step (the paper augments in its CPU loader)",
        "compile": False,
        "attack": (f"paper apgd_train pass structure (n_iter={n_iter}, no random start)"
                   if attack_kind == "paper" else
                   f"raytrain_at APGD.for_training(n_iter={n_iter}), eager")})
