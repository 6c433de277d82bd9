"""Isotropic ConvNeXt (Liu et al. 2022, Sec. 5): a patchify stem, then identical ConvNeXt blocks at
one resolution, like a ViT with depthwise convolutions in place of attention.

Hand-written because timm has no isotropic ConvNeXt; the blocks themselves are timm's
``ConvNeXtBlock`` so the block parameters and their names match timm's ConvNeXt.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers.weight_init import trunc_normal_
from timm.models.convnext import ConvNeXtBlock


class IsotropicConvNeXt(nn.Module):
    """Isotropic ConvNeXt: ``stem`` (stride ``patch_size``) -> ``blocks`` -> mean pool -> LN ->
    head.

    Args:
        num_classes: classifier outputs; 0 gives pooled features.
        in_chans: input channels.
        depth: number of ConvNeXt blocks (18 for the small model).
        dim: width of every block (384 for the small model).
        patch_size: side of the non-overlapping patches of the PatchStem (16).
        drop_path_rate: stochastic depth rate (the paper uses none).
        ls_init_value: layer-scale init value.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, depth: int = 18, dim: int = 384,
                 patch_size: int = 16, drop_path_rate: float = 0.0, ls_init_value: float = 1e-6,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = dim
        self.patch_size = patch_size
        self.global_pool = global_pool
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, kernel_size=7, drop_path=rate, ls_init_value=ls_init_value)
            for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
