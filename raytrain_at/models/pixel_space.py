"""Models that take images in [0, 1]: normalisation lives inside the model.

Attacks, radii and evaluation all work in pixel space (an l_inf radius of 4/255 means 4 grey
levels), so every model the project builds is wrapped once here, with the mean and std of the
backbone's pretrained configuration, and nothing outside ever normalises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


class PixelSpaceClassifier(nn.Module):
    """``backbone((x - mean) / std)`` for ``x`` in [0, 1].

    Args:
        backbone: any classifier that expects normalised inputs (the timm model).
        mean, std: per-channel statistics of the backbone's training data.

    The statistics are non-persistent buffers: state dicts hold only the backbone's weights (under
    ``backbone.``), and the statistics come from the model's recorded preprocessing.
    """

    # Declared for the type checker: nn.Module.__getattr__ types them as Tensor | Module.
    backbone: nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: Sequence[float] | torch.Tensor,
                 std: Sequence[float] | torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside a :class:`PixelSpaceClassifier` (or DeepSpeed/DDP wrapper), else
    ``model``."""
    while True:
        if isinstance(model, PixelSpaceClassifier):
            model = model.backbone
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def normalisation_of(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a :class:`PixelSpaceClassifier` applies, as Python floats (None for any
    other module)."""
    if not isinstance(model, PixelSpaceClassifier):
        return None
    return (tuple(float(v) for v in model.mean.flatten()),
            tuple(float(v) for v in model.std.flatten()))
