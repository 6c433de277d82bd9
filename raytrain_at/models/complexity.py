"""Parameters (M) and FLOPs (G) of a model at a resolution, counted like the paper (App. A.1).

FLOPs come from fvcore, which counts one fused multiply-add as one FLOP; the paper's Table 14 uses
the same counter. Attention matmuls are only visible to fvcore when timm's fused attention kernel
is off, so it is switched off for the count and restored afterwards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import torch
import torch.nn as nn

from raytrain_at.models.pixel_space import unwrap


@dataclass(frozen=True)
class Complexity:
    """Model size: parameters in millions and fvcore FLOPs in billions at ``resolution``."""

    params_m: float
    flops_g: float
    resolution: int


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for module in switched:
        module.fused_attn = False  # pyright: ignore[reportArgumentType]  # torch types Module attributes as Tensor | Module
    try:
        yield
    finally:
        for module in switched:
            module.fused_attn = True  # pyright: ignore[reportArgumentType]  # torch types Module attributes as Tensor | Module


def count_flops(model: nn.Module, resolution: int = 224, in_chans: int = 3) -> int:
    """fvcore FLOPs of one forward pass of a single ``resolution`` x ``resolution`` image."""
    from fvcore.nn import FlopCountAnalysis

    body = unwrap(model)
    was_training = body.training
    body.eval()
    x = torch.zeros(1, in_chans, resolution, resolution,
                    device=next(body.parameters()).device)
    # fvcore warns about every op it does not count (adds, GELU, ...): expected, not news.
    fv_logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        with _unfused_attention(body), torch.no_grad():
            analysis = FlopCountAnalysis(body, x)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = int(analysis.total())
    finally:
        fv_logger.setLevel(level)
        body.train(was_training)
    return total


def complexity(model: nn.Module, resolution: int = 224) -> Complexity:
    """Parameters (M) and FLOPs (G) of ``model`` at ``resolution``."""
    return Complexity(params_m=count_params(unwrap(model)) / 1e6,
                      flops_g=count_flops(model, resolution) / 1e9, resolution=resolution)
