"""The project's timm model names: ConvStem variants of ConvNeXt and ViT, and Isotropic ConvNeXt.

After ``import raytrain_at.models`` (or this module; ``import raytrain_at`` alone stays free of
torch and timm so the CLI starts fast) these build through ``timm.create_model(name,
num_classes=..., pretrained=False, stem=SPEC)``. Each entry builds timm's own backbone (so every
non-stem layer is timm's and loads timm checkpoints) and swaps in the ConvStem of the paper
(App. B), or any stem spec given with ``stem=``, inside timm's model builder: ``features_only``,
``device`` / ``dtype`` (e.g. the meta device), TorchScript and FX work as for timm's own models.
``pretrained=True`` loads the clean ImageNet-1k weights of Table 18 into every non-stem
parameter; the stem stays freshly initialised, as in the paper's clean pre-training.
``pretrained_cfg_overlay=dict(file=PATH)`` takes those weights from a local file instead of the hub.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import model_entrypoint

from raytrain_at.errors import UserError
from raytrain_at.models.backbones import replace_stem, use_small_input_strides
from raytrain_at.models.isotropic import IsotropicConvNeXt
from raytrain_at.models.weights import LoadReport, load_backbone_weights

def _classifier(base: str | None, name: str, stem: str | None, small_input: bool,
                weights: str | None, reports: list[LoadReport], **kwargs: Any) -> nn.Module:
    """The classifier itself: timm's ``base`` model (its own entry function, so every non-stem
    layer is timm's and loads timm checkpoints) or the isotropic ConvNeXt-S (``base`` None),
    with ``stem`` swapped in and, when ``weights`` is given, its clean weights loaded. timm's
    ``build_model_with_cfg`` calls it and then adds the features-only wrapper if asked."""
    if base is None:
        if small_input:
            raise UserError(f"small_input is only defined for ConvNeXt backbones, not {name} "
                            "(paper App. D.6)")
        # The defaults' dict is inferred as dict[str, int]; kwargs may carry any option.
        model: nn.Module = IsotropicConvNeXt(**dict(dict(depth=18, dim=384, patch_size=16),  # pyright: ignore[reportArgumentType]
                                                    **kwargs))
    else:
        model = model_entrypoint(base)(pretrained=False, **kwargs)
    if stem is not None:
        replace_stem(model, stem, name)
    if small_input:
        use_small_input_strides(model)
    if weights is not None:
        reports.append(load_backbone_weights(model, weights, model_name=name))
    return model


def _create(name: str, base: str | None, default_stem: str | None, hub_weights: str | None,
            pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """One of our models through timm's builder (so ``features_only``, ``device``, ``dtype``
    and the pretrained cfg behave as for timm's own models). ``pretrained=True`` loads the clean
    ImageNet-1k weights of Table 18 (from ``pretrained_cfg_overlay=dict(file=PATH)`` when given)
    and takes their normalisation into the cfg."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    stem = kwargs.pop("stem", None) or default_stem
    small_input = bool(kwargs.pop("small_input", False))
    source = overlay.get("file") or (f"hub:{hub_weights}" if hub_weights else None)
    if pretrained and source is None:
        raise UserError(f"{name} has no downloadable clean weights: pass a local checkpoint "
                        "(pretrained_cfg_overlay=dict(file=PATH))")
    reports: list[LoadReport] = []
    features = base is None or base.startswith(("deit", "vit"))
    model = build_model_with_cfg(
        partial(_classifier, base, name, stem, small_input, source if pretrained else None,
                reports),
        name, pretrained=False,
        feature_cfg=(dict(out_indices=3, feature_cls="getter") if features else
                     dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)),
        **kwargs)
    if reports and reports[0].mean is not None:
        cfg = dict(cast("dict[str, Any]", model.pretrained_cfg))  # timm's, typed Tensor | Module
        model.pretrained_cfg = model.default_cfg = dict(  # pyright: ignore[reportArgumentType]
            cfg, mean=reports[0].mean, std=reports[0].std)
    return model


def _cfg(first_conv: str, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
         std: tuple[float, ...] = IMAGENET_DEFAULT_STD, classifier: str = "head.fc",
         **extra: Any) -> dict[str, Any]:
    """timm's pretrained cfg of one of our models: the paper's 224 px input with a 0.875 bicubic
    crop (App. A.4) and the normalisation of the clean weights of Table 18. No weights are
    hosted: a trained model carries its own record (``raytrain_at.models.model_files``)."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), crop_pct=0.875,
                interpolation="bicubic", mean=mean, std=std, first_conv=first_conv,
                classifier=classifier, license="apache-2.0", **extra)


# ViTs keep timm's fixed input size (their positional embeddings are for one grid; other sides
# take ``dynamic_img_size=True`` or ``set_input_size``), as timm's own ViT cfgs do.
_VIT: dict[str, Any] = dict(first_conv="patch_embed.proj.0", classifier="head",
                           fixed_input_size=True)

# Picked up by ``@register_model`` below (it looks for ``default_cfgs`` in this module), so
# ``timm.models.get_pretrained_cfg(name)`` and ``timm.data.resolve_data_config`` know them.
default_cfgs = generate_default_cfgs({
    **{name: _cfg("stem.0", pool_size=(7, 7)) for name in (
        "convnext_atto_cvst", "convnext_tiny_cvst", "convnext_small_cvst", "convnext_base_cvst",
        "convnext_large_cvst")},
    "vit_small_cvst": _cfg(**_VIT),  # DeiT-S: ImageNet mean / std
    "vit_medium_cvst": _cfg(**_VIT),  # DeiT III-M: ImageNet mean / std
    "vit_base_cvst": _cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **_VIT),  # augreg
    "convnext_iso_small": _cfg("stem", classifier="head", pool_size=(14, 14)),
    "convnext_iso_small_cvst": _cfg("stem.0", classifier="head", pool_size=(14, 14)),
})


# ConvNeXt + ConvStem (Fig. 2; Table 8 C2 for ConvNeXt-B). Clean weights: Table 18.
@register_model
def convnext_tiny_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-T + ConvStem: two 3x3 stride-2 convolutions 3->48->96, each with LN and GELU."""
    return _create("convnext_tiny_cvst", "convnext_tiny", "table7:6", "convnext_tiny.fb_in1k",
                  pretrained, kwargs)


@register_model
def convnext_small_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-S + ConvStem: the ConvNeXt-T stem (3->48->96)."""
    return _create("convnext_small_cvst", "convnext_small", "table7:6", "convnext_small.fb_in1k",
                  pretrained, kwargs)


@register_model
def convnext_base_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-B + ConvStem: design C2 of Table 8 (64 s2, 96 s2, 128 s1)."""
    return _create("convnext_base_cvst", "convnext_base", "table8:C2", "convnext_base.fb_in1k",
                  pretrained, kwargs)


@register_model
def convnext_large_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-L + ConvStem: the ConvNeXt-B design C2 scaled to width 192 (96 s2, 144 s2,
    192 s1), as in the paper's published ConvNeXt-L checkpoint (RobustBench)."""
    return _create("convnext_large_cvst", "convnext_large", "k3s2c96LG-k3s2c144LG-k3s1cDLG",
                  "convnext_large.fb_in1k", pretrained, kwargs)


@register_model
def convnext_atto_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-atto (3.7M) + a two-layer ConvStem 3->20->40: the small model of CPU runs."""
    return _create("convnext_atto_cvst", "convnext_atto", "k3s2c20LG-k3s2cDLG",
                  "convnext_atto.d2_in1k", pretrained, kwargs)


# ViT + ConvStem: Table 9 C1 (48-96-192-384, 3x3 stride 2) and a 1x1 projection to the width.
@register_model
def vit_small_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S/16 + ConvStem C1 (width 384); clean weights deit_small_patch16_224."""
    return _create("vit_small_cvst", "deit_small_patch16_224", "table9:C1",
                  "deit_small_patch16_224.fb_in1k", pretrained, kwargs)


@register_model
def vit_medium_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-M/16 + ConvStem C1 with a 1x1 projection to 512; clean weights deit3_medium."""
    return _create("vit_medium_cvst", "deit3_medium_patch16_224", "table9:C1",
                  "deit3_medium_patch16_224.fb_in1k", pretrained, kwargs)


@register_model
def vit_base_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-B/16 + ConvStem C1 with a 1x1 projection to 768; clean weights augreg_in1k."""
    return _create("vit_base_cvst", "vit_base_patch16_224", "table9:C1",
                  "vit_base_patch16_224.augreg_in1k", pretrained, kwargs)


# Isotropic ConvNeXt-S (18 blocks, width 384, 16x16 PatchStem) and its ConvStem variant (Table 9
# C1).
@register_model
def convnext_iso_small(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Isotropic ConvNeXt-S: 22.3M parameters."""
    return _create("convnext_iso_small", None, None, None, pretrained, kwargs)


@register_model
def convnext_iso_small_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Isotropic ConvNeXt-S + ConvStem (the ViT-S ConvStem, C1 of Table 9)."""
    return _create("convnext_iso_small_cvst", None, "table9:C1", None, pretrained, kwargs)


# The project's own names.
CONVSTEM_MODELS: tuple[str, ...] = (
    "convnext_atto_cvst", "convnext_tiny_cvst", "convnext_small_cvst", "convnext_base_cvst",
    "convnext_large_cvst", "vit_small_cvst",
    "vit_medium_cvst", "vit_base_cvst", "convnext_iso_small_cvst")
