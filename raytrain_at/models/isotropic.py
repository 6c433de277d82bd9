"""Isotropic ConvNeXt (Liu et al. 2022, Sec. 5): a patchify stem, then identical ConvNeXt blocks at
one resolution, like a ViT with depthwise convolutions in place of attention.

Hand-written because timm has no isotropic ConvNeXt; the blocks themselves are timm's
``ConvNeXtBlock`` so the block parameters and their names match timm's ConvNeXt. Liu et al.'s
isotropic models are trained without layer scale (their repository's ``layer_scale_init_value``
is 0 for them, and its checkpoints hold no ``gamma``), so layer scale is off unless asked for.
The model speaks timm's model API (features, intermediates, classifier reset, device and dtype at
construction), so timm's own model tests and feature wrappers accept it. No ``from __future__
import annotations`` here: torch.fx copies the forward's annotations into generated code, which
TorchScript must be able to read as types, not strings.
"""

from typing import cast

import torch
import torch.nn as nn
from timm.layers.drop import calculate_drop_path_rates
from timm.layers.helpers import get_device_dtype
from timm.layers.weight_init import trunc_normal_
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models.convnext import ConvNeXtBlock

_POOLS = ("avg", "")


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
        ls_init_value: layer-scale init value; None (Liu et al.'s isotropic models) for none.
        global_pool: ``"avg"`` (the model's) or ``""`` (no pooling: NCHW features out).
        drop_rate: dropout before the classifier.
        device, dtype: where and in which type the parameters are created (timm's factory
            arguments, e.g. ``device="meta"``).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, depth: int = 18, dim: int = 384,
                 patch_size: int = 16, drop_path_rate: float = 0.0,
                 ls_init_value: float | None = None, global_pool: str = "avg",
                 drop_rate: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool {global_pool!r}: one of {_POOLS}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.patch_size = patch_size
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, **dd)
        # On the CPU whatever the device (a meta-device model cannot read its own linspace).
        rates = cast("list[float]", calculate_drop_path_rates(drop_path_rate, depth))
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, kernel_size=7, drop_path=rate, ls_init_value=ls_init_value, **dd)
            for rate in rates])
        # Every block is one feature level at the stem's stride (as timm does for ViTs).
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups for layer-wise learning rates (timm's convention)."""
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier of ``num_classes`` outputs (0: none), on the model's device and
        dtype and in its training mode."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool {global_pool!r}: one of {_POOLS}")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        self.head = (nn.Linear(self.num_features, num_classes, device=dd["device"],
                               dtype=dd["dtype"]) if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks' outputs (timm's contract): the last ``indices`` blocks if an int, all if
        None, those listed otherwise. ``norm`` is accepted for the API; the final LayerNorm
        acts on pooled features, so intermediates are never normalised."""
        assert output_fmt == "NCHW", "Output format must be NCHW."
        intermediates: list[torch.Tensor] = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.stem(x)
        scripting = torch.jit.is_scripting()  # pyright: ignore[reportPrivateImportUsage]
        if scripting or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one ``indices`` needs (and the head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():  # pyright: ignore[reportPrivateImportUsage]
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = self.norm(x.mean(dim=(2, 3)))
        else:  # no pooling: the LayerNorm over channels, features stay NCHW
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
