"""DeepSpeed engine construction: config, optimiser groups, LR schedule, EMA.

DeepSpeed owns the optimiser step (ZeRO stage 0/1/2; bf16 on GPU, fp32 on CPU, where it refuses
fp16). The optimiser is torch's AdamW (DeepSpeed's own AdamW compiles a C++ op), with the paper's
betas (0.9, 0.95) and the usual no-decay rule: biases, norm weights and other 1-D parameters, and
the backbone's ``no_weight_decay()`` set (positional embedding, class token) are not decayed.
Gradient clipping is always written into the DeepSpeed config, because DeepSpeed's default is 1.0.
The EMA of the weights is timm's ``ModelEmaV3``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from raytrain_at.config import RunConfig
from raytrain_at.models.pixel_space import unwrap
from raytrain_at.training.schedules import lr_factor

log = logging.getLogger(__name__)


def resolve_precision(config: RunConfig, device: torch.device) -> str:
    """bf16 on GPU, fp32 on CPU unless the config says otherwise (fp16 is never used)."""
    if config.scaling.precision != "auto":
        return config.scaling.precision
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(config: RunConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (per-worker micro batch, ZeRO stage, precision)."""
    return {
        "train_micro_batch_size_per_gpu": config.per_worker_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(config.optim.grad_clip or 0.0),
        "zero_optimization": {"stage": config.optim.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decayed weights, and the no-decay group."""
    body = unwrap(model)
    skip = set(getattr(body, "no_weight_decay", lambda: set())())
    prefix = "backbone." if model is not body else ""
    return param_groups_weight_decay(model, weight_decay,
                                     no_weight_decay_list={prefix + name for name in skip})


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(optimizer_groups(model, config.optim.weight_decay),
                             lr=config.optim.lr, betas=tuple(config.optim.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * config.schedule.epochs
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=total, warmup_steps=warmup, peak_lr=config.optim.lr,
        min_lr=config.optim.min_lr))


def build_engine(model: nn.Module, config: RunConfig, steps_per_epoch: int, device: torch.device):
    """Wrap ``model`` in a DeepSpeed engine that owns optimiser, LR schedule and precision.

    Returns:
        (engine, optimizer, scheduler)
    """
    import deepspeed

    precision = resolve_precision(config, device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, precision))
    return engine, optimizer, scheduler


def build_ema(model: nn.Module, decay: float | None) -> ModelEmaV3 | None:
    """timm's EMA of the weights (fp32 copy), or None when disabled."""
    if decay is None:
        return None
    return ModelEmaV3(model, decay=decay)
