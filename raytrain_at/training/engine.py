"""DeepSpeed engine construction: config, optimiser groups, LR schedule, EMA.

DeepSpeed owns the optimiser step (ZeRO stage 0/1/2; bf16 on GPU, fp32 on CPU, where it refuses
fp16). Gradients are accumulated and all-reduced in fp32 also when the weights are bf16
(:func:`deepspeed_config`), which ZeRO stage 0 cannot do: bf16 runs take stage 1 or 2.
The optimiser is torch's fused AdamW (DeepSpeed's own AdamW compiles a C++ op), with the
paper's betas (0.9, 0.95) and the usual no-decay rule: biases, norm weights and other 1-D
parameters, and the backbone's ``no_weight_decay()`` set (positional embedding, class token) are
not decayed.
Gradient clipping is always written into the DeepSpeed config, because DeepSpeed's default is 1.0.
The EMA of the weights is timm's ``ModelEmaV3``, kept in fp32 (also when DeepSpeed runs the
model in bf16). The engine loads checkpoints weights-only (:mod:`.safe_loading`).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay  # pyright: ignore[reportPrivateImportUsage]
from timm.utils.model_ema import ModelEmaV3

from raytrain_at.config import BF16_NEEDS_ZERO, RunConfig
from raytrain_at.errors import UserError
from raytrain_at.models.pixel_space import unwrap
from raytrain_at.training.safe_loading import use_weights_only_loading
from raytrain_at.training.schedules import lr_factor

log = logging.getLogger(__name__)


def resolve_precision(config: RunConfig, device: torch.device) -> str:
    """bf16 on GPU, fp32 on CPU unless the config says otherwise (fp16 is never used)."""
    if config.scaling.precision != "auto":
        return config.scaling.precision
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(config: RunConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (per-worker micro batch, ZeRO stage, precision).

    Raises:
        UserError: bf16 with ZeRO stage 0, which cannot accumulate gradients in fp32.
    """
    if precision == "bf16" and config.optim.zero_stage == 0:
        # Config validation refuses this where it knows the precision; "auto" resolves here.
        raise UserError(BF16_NEEDS_ZERO)
    return {
        "train_micro_batch_size_per_gpu": config.per_worker_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(config.optim.grad_clip or 0.0),
        "zero_optimization": {"stage": config.optim.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # Gradients in fp32 whatever the weights are: bf16 keeps 8 bits of mantissa, and a sum of
        # the ranks' gradients in it loses the small contributions (the paper's fp16 AMP keeps
        # fp32 master gradients). With bf16 weights DeepSpeed 0.19.8 then steps ZeRO-1 through
        # its BF16_Optimizer (fp32 gradient buffers beside the partitioned fp32 master weights)
        # and ZeRO-2 through fp32 gradient partitions; without the communication type both would
        # cast the fp32 buffers to bf16 for the all-reduce. fp32 runs are unchanged.
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model``) of the classifier head's parameters.

    The head is what timm's ``pretrained_cfg['classifier']`` names (``head.fc`` for ConvNeXt,
    ``head`` for ViT, ``fc`` for ResNet): the same module timm replaces for a new class count.
    """
    body = unwrap(model)
    prefix = "backbone." if model is not body else ""
    classifier = (getattr(body, "pretrained_cfg", None) or {}).get("classifier")
    if not classifier:
        raise ValueError(f"{type(body).__name__} names no classifier in its pretrained_cfg")
    heads = [classifier] if isinstance(classifier, str) else list(classifier)
    names = {name for name, _ in model.named_parameters()
             if any(name == prefix + h or name.startswith(prefix + h + ".") for h in heads)}
    if not names:
        raise ValueError(f"no parameters under the classifier {heads} of {type(body).__name__}")
    return names


def freeze_all_but_head(model: nn.Module) -> None:
    """Linear probing: only the head's parameters require gradients."""
    head = head_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in head)


def optimizer_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None,
                     head_lr: float | None = None,
                     head_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters.

    Without a head setting: the decayed weights and the no-decay group (biases, norm weights,
    1-D parameters, ``no_weight_decay()``). With ``head_lr`` or ``head_weight_decay``: the same
    split for the backbone and for the classifier head, each group with its own ``lr`` and
    ``weight_decay`` (the robust fine-tuning benchmark's separate groups).
    """
    body = unwrap(model)
    skip = set(getattr(body, "no_weight_decay", lambda: set())())
    prefix = "backbone." if model is not body else ""
    no_decay = {prefix + name for name in skip}
    if head_lr is None and head_weight_decay is None:
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    head = head_parameter_names(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 or name.endswith(".bias") or name in no_decay)
        groups.setdefault(("head" if name in head else "backbone", decayed), []).append(param)
    settings = {"backbone": (lr, weight_decay),
                "head": (head_lr if head_lr is not None else lr,
                         head_weight_decay if head_weight_decay is not None else weight_decay)}
    out = []
    for (part, decayed), params in groups.items():
        group_lr, group_wd = settings[part]
        group = {"params": params, "weight_decay": group_wd if decayed else 0.0, "name": part}
        if group_lr is not None:
            group["lr"] = group_lr
        out.append(group)
    return out


def fused_adamw_supported(model: nn.Module) -> bool:
    """Whether torch's fused AdamW kernel can update every trainable parameter of ``model``
    (floating point on CUDA or CPU): one kernel launch for all tensors instead of a dozen per
    tensor group, the cheapest optimizer step on a GPU."""
    return all(p.is_floating_point() and p.device.type in ("cuda", "cpu")
               for p in model.parameters() if p.requires_grad)


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    o = config.optim
    groups = optimizer_groups(model, o.weight_decay, lr=o.lr, head_lr=o.head_lr,
                              head_weight_decay=o.head_weight_decay)
    # DeepSpeed hands this optimizer its own fp32 (master / ZeRO-partition) tensors on the same
    # device, so the fused kernel still applies after deepspeed.initialize.
    return torch.optim.AdamW(groups, lr=o.lr, betas=cast("tuple[float, float]", tuple(o.betas)),
                             fused=fused_adamw_supported(model))


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * config.schedule.epochs
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=total, warmup_steps=warmup, peak_lr=config.optim.lr,
        min_lr=config.optim.min_lr, schedule=config.optim.schedule))


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
        # DeepSpeed annotates torch's old _LRScheduler; LambdaLR derives from LRScheduler.
        model=model, optimizer=optimizer,
        lr_scheduler=scheduler,  # pyright: ignore[reportArgumentType]
        config=deepspeed_config(config, precision))
    # A resume reads files any node may write: never unpickle objects from them.
    use_weights_only_loading(engine)
    return engine, optimizer, scheduler


def build_ema(model: nn.Module, decay: float | None) -> ModelEmaV3 | None:
    """timm's EMA of the weights, kept in fp32 whatever the live weights are, or None when
    disabled. Build it from the fp32 weights, before DeepSpeed casts the module to bf16: a bf16
    copy would start from rounded values, and an update of (1 - decay) * (w - ema) at decay 0.999
    is below bf16's resolution and rounds away (found by ``scripts/gpu_check.sh``'s CPU smoke
    run)."""
    if decay is None:
        return None
    return ModelEmaV3(model, decay=decay, dtype=torch.float32)
