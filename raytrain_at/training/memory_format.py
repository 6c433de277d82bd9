"""Channels_last convolution weights that survive DeepSpeed ZeRO-1/2.

``model.to(memory_format=torch.channels_last)`` does not last under DeepSpeed: ZeRO-1/2 (and the
BF16_Optimizer of ZeRO-1 + bf16) copy the parameters into one flat buffer with
``_flatten_dense_tensors`` (NCHW element order) and re-point each ``param.data`` at a contiguous
``narrow(...).view(shape)`` of it, so every conv weight is NCHW again and cuDNN transposes each
weight and weight gradient on every forward and backward pass (many per step with an attack).

Design: each 4-D conv weight is stored as a contiguous parameter of shape (out, kh, kw, in),
and the module reads it through ``torch.nn.utils.parametrize`` as ``original.permute(0, 3, 1, 2)``:
a view with the NCHW shape and channels_last strides. DeepSpeed then only ever sees ordinary
contiguous parameters; the flat weight buffer, the fp32 master partition, the gradient and the
Adam moments of that parameter all share its (out, kh, kw, in) shape, and its gradient arrives
in that shape (autograd's permute backward), so every element is updated with its own gradient
by construction, whatever DeepSpeed does with ``view(-1)``, ``contiguous()`` or re-pointing.
The alternative, re-pointing parameters at channels_last views of the flat buffer after each
place DeepSpeed re-points them, would also need the gradients copied into the flat gradient
buffer in NHWC order, which DeepSpeed's ``clone(memory_format=contiguous_format)`` and
``view(-1)`` copies do not do: a silent scramble of updates, and a patch of DeepSpeed internals.

What the rest of the project sees is unchanged: ``conv.weight`` has its NCHW shape, and state
dicts (model files, DeepSpeed's module checkpoint, the EMA's in-place lerp) use the key
``<conv>.weight`` with the NCHW shape, in the usual key order: a state-dict hook renames the
stored ``parametrizations.weight.original`` and returns a *view* of it (timm's ModelEmaV3 lerps
into the state-dict tensors in place), and a load pre-hook turns an NCHW ``weight`` back.

Only the parameter names (``named_parameters``) differ, and so does the element order of the
conv weights inside DeepSpeed's ZeRO optimizer checkpoint: a checkpoint written with one
layout must be resumed with the same ``scaling.channels_last`` setting and device type
(:func:`channels_last_weights` lists what a run converted, for that check).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

# Where parametrize keeps the stored tensor, relative to the conv module.
_STORED = "parametrizations.weight.original"


class _NhwcWeight(nn.Module):
    """The conv weight as a channels_last view of its (out, kh, kw, in) storage."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.permute(0, 3, 1, 2)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        nhwc = weight.permute(0, 2, 3, 1)
        # Fresh row-major strides: ``contiguous()`` keeps the permuted stride of a size-1 last
        # dimension (depthwise weights), and DeepSpeed's broadcast views each parameter as bytes,
        # which needs stride 1 there.
        return torch.empty(nhwc.shape, dtype=nhwc.dtype, device=nhwc.device).copy_(nhwc)


def _state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                     local_metadata: Any) -> None:
    """``<prefix>parametrizations.weight.original`` -> ``<prefix>weight`` (NCHW view), first
    among the module's keys as in a plain conv. This module's keys are the last ones added."""
    stored = state_dict.pop(prefix + _STORED, None)
    if stored is None:
        return
    own = [(k, state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix)]
    state_dict[prefix + "weight"] = stored.permute(0, 3, 1, 2)
    state_dict.update(own)


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
                   ) -> None:
    """An NCHW ``<prefix>weight`` goes into the (out, kh, kw, in) storage."""
    weight = state_dict.pop(prefix + "weight", None)
    if weight is None:
        return
    # A tensor of the wrong rank is passed on as it is: load_state_dict names the size mismatch.
    state_dict[prefix + _STORED] = weight.permute(0, 2, 3, 1) if weight.ndim == 4 else weight


def keep_channels_last(model: nn.Module) -> nn.Module:
    """Store every 2-D convolution's weight of ``model`` so that it stays channels_last through
    ``deepspeed.initialize`` and every optimizer step (see the module docstring), in place.

    Call it before the EMA and the engine are built (both then share the layout). Works on any
    device; the product uses it on CUDA only, where cuDNN gains from it. Idempotent.

    Returns:
        ``model``, for chaining.
    """
    for conv in model.modules():
        if (not isinstance(conv, nn.Conv2d) or conv.weight.ndim != 4
                or parametrize.is_parametrized(conv, "weight")):
            continue
        parametrize.register_parametrization(conv, "weight", _NhwcWeight())
        conv.register_state_dict_post_hook(_state_dict_hook)
        conv.register_load_state_dict_pre_hook(_load_pre_hook)
    return model


def channels_last_weights(model: nn.Module) -> list[str]:
    """Names of the conv modules whose weights :func:`keep_channels_last` stored NHWC."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, _NhwcWeight)
                    for p in cast(nn.ModuleDict, m.parametrizations)["weight"].children())]


def conv_weights(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """Every 2-D convolution's weight as the module reads it (NCHW shape), by module name."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
