"""Where each backbone family keeps its stem, and how to change stem, input size and strides.

One small adapter per family, looked up by module type, so the rest of the package never branches
on model names: replacing a stem, checking a test-time resolution or switching to small (32x32)
inputs all go through :func:`adapter_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch.nn as nn
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from raytrain_at.errors import UserError
from raytrain_at.models.isotropic import IsotropicConvNeXt
from raytrain_at.models.stems import ConvStem, StemSpec, build_stem


@dataclass(frozen=True)
class BackboneAdapter:
    """How one family of backbones exposes its stem.

    Attributes:
        family: short family name recorded with the model ("convnext", "vit", "convnext_iso").
        stem_prefix: state-dict prefix of the stem's parameters.
        stride: the downsampling the body expects from the stem.
        width: function giving the channel width the body expects.
        get_stem / set_stem: read and replace the stem module.
        min_side: smallest input side the backbone accepts.
        patch_stem_norm: the norm after the PatchStem's convolution, in stem-spec letters
            ("L" for ConvNeXt's LayerNorm, "" for none).
    """

    family: str
    stem_prefix: str
    # Any: the family's model class, whose attributes nn.Module's __getattr__ leaves untyped.
    stride: Callable[[Any], int]
    width: Callable[[Any], int]
    get_stem: Callable[[Any], nn.Module]
    set_stem: Callable[[nn.Module, nn.Module], None]
    min_side: int
    patch_stem_norm: str = ""


def _set_convnext_stem(model: nn.Module, stem: nn.Module) -> None:
    model.stem = stem


def _set_vit_stem(model: nn.Module, stem: nn.Module) -> None:
    # PatchEmbed keeps its flatten/norm/grid bookkeeping; only the projection becomes the stem.
    model.patch_embed.proj = stem  # pyright: ignore[reportAttributeAccessIssue]  # a PatchEmbed


_ADAPTERS: dict[type, BackboneAdapter] = {
    ConvNeXt: BackboneAdapter(
        family="convnext", stem_prefix="stem.", stride=lambda m: 4,
        width=lambda m: m.stages[0].blocks[0].conv_dw.in_channels,
        get_stem=lambda m: m.stem, set_stem=_set_convnext_stem, min_side=32,
        patch_stem_norm="L"),
    VisionTransformer: BackboneAdapter(
        family="vit", stem_prefix="patch_embed.proj.", stride=lambda m: m.patch_embed.patch_size[0],
        width=lambda m: m.embed_dim, get_stem=lambda m: m.patch_embed.proj,
        set_stem=_set_vit_stem, min_side=16),
    IsotropicConvNeXt: BackboneAdapter(
        family="convnext_iso", stem_prefix="stem.", stride=lambda m: m.patch_size,
        width=lambda m: m.embed_dim, get_stem=lambda m: m.stem, set_stem=_set_convnext_stem,
        min_side=16),
}


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The adapter for ``model``'s family.

    Raises:
        UserError: for a backbone family the project does not know how to modify.
    """
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    raise UserError(f"model type {type(model).__name__} has no stem adapter; supported families: "
                    "ConvNeXt, VisionTransformer, IsotropicConvNeXt")


def replace_stem(model: nn.Module, spec: str | StemSpec, model_name: str) -> ConvStem:
    """Replace ``model``'s stem with a freshly initialised stem built from ``spec``.

    The spec is validated against the backbone (total stride, output width) before anything changes.
    """
    adapter = adapter_for(model)
    old = _first_conv(adapter.get_stem(model))
    # On the device and in the dtype the model was created with (timm's factory arguments, e.g.
    # a model built on the meta device).
    stem = build_stem(spec, stride=adapter.stride(model), width=adapter.width(model),
                      model_name=model_name, in_chans=old.in_channels,
                      device=old.weight.device, dtype=old.weight.dtype)
    adapter.set_stem(model, stem)
    model.stem_spec = stem.spec.text  # pyright: ignore[reportArgumentType]  # torch types Module attributes as Tensor | Module
    return stem


def _first_conv(module: nn.Module) -> nn.Conv2d:
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return sub
    raise UserError(f"stem {type(module).__name__} has no convolution")


def patch_stem_spec(model: nn.Module) -> str:
    """The stem spec of the backbone family's own PatchStem at this model's stride and width
    (Table 7 row 1, Table 8 P1, Table 9 P1): the one ConvStem design whose tensors are those of
    the clean checkpoints' stem."""
    adapter = adapter_for(model)
    stride = adapter.stride(model)
    return f"k{stride}s{stride}cD{adapter.patch_stem_norm}"


def stem_spec_of(model: nn.Module) -> str | None:
    """The stem spec a model was built with, or None for the backbone's own PatchStem."""
    return getattr(model, "stem_spec", None)


def set_test_resolution(model: nn.Module, resolution: int) -> None:
    """Prepare ``model`` for square inputs of side ``resolution`` without retraining.

    ViTs get their absolute positional embeddings resampled (bicubic, as in timm) to the new patch
    grid; convolutional backbones need nothing but a minimum side.

    Raises:
        UserError: if the side is too small or not a multiple of the ViT's patch grid.
    """
    if not any(cls in _ADAPTERS for cls in type(model).__mro__):
        return  # another convolutional network: it takes any side
    adapter = adapter_for(model)
    if resolution < adapter.min_side:
        raise UserError(f"resolution {resolution} is below the minimum {adapter.min_side} for "
                        f"{adapter.family} models")
    stride = adapter.stride(model)
    if isinstance(model, VisionTransformer):
        if resolution % stride:
            raise UserError(f"resolution {resolution} is not a multiple of the ViT patch size "
                            f"{stride}")
        model.set_input_size(img_size=(resolution, resolution))


def use_small_input_strides(model: nn.Module) -> None:
    """Adapt a ConvNeXt for small images (e.g. CIFAR 32x32), as in the paper's App. D.6.

    Every stride-2 convolution of the stem and the first downsampling layer of the body get stride
    1, so a 32x32 image gives feature maps of 32, 31, 15 and 7 in the four stages (a 224 image gives
    56, 28, 14, 7): the last stages see the spatial extent they were trained for.

    Raises:
        UserError: for backbones other than ConvNeXt, or a stem that is a single patchifier.
    """
    if not isinstance(model, ConvNeXt):
        raise UserError(f"small_input is only defined for ConvNeXt backbones, not "
                        f"{type(model).__name__} (paper App. D.6)")
    convs = [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)]
    if not any(conv.stride[0] == 2 for conv in convs):
        raise UserError("small_input needs a ConvStem with stride-2 layers (e.g. table7:6), not a "
                        "PatchStem")
    for conv in convs:
        if conv.stride[0] == 2:
            conv.stride = (1, 1)
    # ConvNeXt's submodules, typed Tensor | Module by nn.Module.__getattr__.
    first_down = [m for m in model.stages[1].downsample.modules()  # pyright: ignore[reportAttributeAccessIssue]
                  if isinstance(m, nn.Conv2d)][0]
    first_down.stride = (1, 1)
    model.small_input = True  # pyright: ignore[reportArgumentType]  # torch types Module attributes as Tensor | Module
