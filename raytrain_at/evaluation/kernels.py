"""Which GPU kernels AutoAttack runs on: ``exact`` (torch's defaults, as a plain pyautoattack call)
or ``fast`` (TF32 matrix multiplies and channels_last convolutions), the latter verified by the
former.

Why these two levers: AutoAttack runs in fp32. With torch's defaults an H100 runs fp32 matrix
multiplies (every ViT layer, ConvNeXt's pointwise MLPs) without its tensor cores, while convolutions
already use TF32 (``torch.backends.cudnn.allow_tf32`` is on by default). ``fast`` turns TF32 on for
matrix multiplies too and keeps the weights channels_last (ConvNeXt's depthwise convolutions run
faster in that layout); the model still takes and returns gradients for NCHW images, which
pyautoattack reshapes with ``.view``. bf16 and ``torch.compile`` are not used: bf16 gradients
weaken the attacks, and a compiled model recompiles for every survivor-set size and trips
AutoAttack's dynamic-defence check.

Verification: TF32 rounds the attack's arithmetic differently, so a point the fast model
misclassifies could in principle be correct under exact arithmetic. In ``fast`` mode the clean pass
and every reported break are therefore re-run with exact kernels (one forward per image), and a
break the exact model does not confirm is not counted: the robust accuracy never drops because of
the faster arithmetic. On a CPU both modes run the same kernels.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from raytrain_at.errors import UserError

KERNELS: tuple[str, ...] = ("exact", "fast")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise UserError(f"unknown --kernels {kernels!r} (known: {', '.join(KERNELS)})")
    return kernels


@contextmanager
def kernel_settings(kernels: str) -> Iterator[None]:
    """Run the block with ``kernels``' TF32 settings (``exact``: torch's defaults), then restore
    whatever was set before."""
    check_kernels(kernels)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    fast = kernels == "fast"
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = True  # torch's default, on in both modes
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _ChannelsLast(torch.autograd.Function):
    """Identity that hands the model channels_last images and returns NCHW-contiguous gradients
    (pyautoattack flattens input gradients with ``.view``, which a channels_last gradient fails)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ChannelsLastModel(nn.Module):
    """``model`` with channels_last weights, called with NCHW images like any other model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return self.model(x)
        return self.model(_ChannelsLast.apply(x))


def attack_model(model: nn.Module, kernels: str, device: torch.device) -> nn.Module:
    """The model the attacks run on: ``model`` itself for ``exact`` or on a CPU, its
    channels_last twin (sharing no storage with ``model``) for ``fast`` on a GPU."""
    check_kernels(kernels)
    if kernels == "exact" or device.type != "cuda":
        return model

    return ChannelsLastModel(copy.deepcopy(model)).eval()
