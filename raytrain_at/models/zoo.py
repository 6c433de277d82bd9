"""The project's timm model names: ConvStem variants of ConvNeXt and ViT, and Isotropic ConvNeXt.

After ``import raytrain_at`` these build through ``timm.create_model(name, num_classes=...,
pretrained=False, stem=SPEC)``. Each entry builds timm's own backbone (so every non-stem layer is
timm's and loads timm checkpoints) and swaps in the ConvStem of the paper (App. B), or any stem
spec given with ``stem=``. ``pretrained=True`` loads the clean ImageNet-1k weights of Table 18 into
every non-stem parameter; the stem stays freshly initialised, as in the paper's clean pre-training.
``pretrained_cfg_overlay=dict(file=PATH)`` takes those weights from a local file instead of the hub.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from raytrain_at.errors import UserError
from raytrain_at.models.backbones import replace_stem, use_small_input_strides
from raytrain_at.models.isotropic import IsotropicConvNeXt

# Keys timm passes to every entry function that our builders consume themselves.
_TIMM_CFG_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _pretrained_cfg(name: str, base: dict[str, Any], hub_weights: str | None) -> dict[str, Any]:
    cfg = dict(base)
    cfg.update(architecture=name, tag=None, hf_hub_id=None, url=None, file=None,
               clean_weights=hub_weights)
    return cfg


def _own_options(kwargs: dict[str, Any], default_stem: str | None
                 ) -> tuple[str | None, str | None, bool]:
    """Take our options out of the entry-function kwargs: (local weights file, stem spec,
    small_input). timm's own cfg keys are dropped: these models get their cfg set below."""
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    for key in _TIMM_CFG_KEYS:
        kwargs.pop(key, None)
    stem = kwargs.pop("stem", None) or default_stem
    return overlay.get("file"), stem, bool(kwargs.pop("small_input", False))


def _finish(model: nn.Module, name: str, stem: str | None, cfg: dict[str, Any],
            pretrained: bool, source: str | None) -> nn.Module:
    """Swap in the stem, record the cfg, and load clean weights into the non-stem parameters."""
    if stem is not None:
        replace_stem(model, stem, name)
    model.pretrained_cfg = model.default_cfg = cfg  # pyright: ignore[reportArgumentType]  # torch types Module attributes as Tensor | Module
    if pretrained:
        from raytrain_at.models.weights import load_backbone_weights

        load_backbone_weights(model, source, model_name=name)
    return model


def _build(name: str, base_arch: str, default_stem: str | None, hub_weights: str | None,
           pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``base_arch`` from timm, swap the stem, and optionally load clean weights."""
    weights_file, stem, small_input = _own_options(kwargs, default_stem)
    model = timm.create_model(base_arch, pretrained=False, **kwargs)
    cfg = _pretrained_cfg(name, dict(getattr(model, "pretrained_cfg", {}) or {}), hub_weights)
    source = weights_file or (f"hub:{hub_weights}" if hub_weights else None)
    model = _finish(model, name, stem, cfg, pretrained, source)
    if small_input:
        use_small_input_strides(model)
    return model


def _iso_model(name: str, default_stem: str | None, pretrained: bool, kwargs: dict[str, Any]
               ) -> nn.Module:
    weights_file, stem, small_input = _own_options(kwargs, default_stem)
    if small_input:
        raise UserError(f"small_input is only defined for ConvNeXt backbones, not {name} "
                        "(paper App. D.6)")
    # The defaults' dict is inferred as dict[str, int]; kwargs may carry any option.
    model = IsotropicConvNeXt(**dict(dict(depth=18, dim=384, patch_size=16), **kwargs))  # pyright: ignore[reportArgumentType]
    cfg = dict(architecture=name, input_size=(3, 224, 224), crop_pct=0.875,
               interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               num_classes=model.num_classes, first_conv="stem.0" if stem else "stem",
               classifier="head",
               # The paper's clean weights come from the ConvNeXt repository, not the hub.
               clean_weights=None)
    return _finish(model, name, stem, cfg, pretrained, weights_file)


def _cfg(first_conv: str, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
         std: tuple[float, ...] = IMAGENET_DEFAULT_STD, classifier: str = "head.fc"
         ) -> dict[str, Any]:
    """timm's pretrained cfg of one of our models: the paper's 224 px input with a 0.875 bicubic
    crop (App. A.4) and the clean backbone's normalisation. No weights are hosted: a trained
    model carries its own record (``raytrain_at.models.model_files``)."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bicubic", mean=mean, std=std,
                first_conv=first_conv, classifier=classifier, license="apache-2.0")


# Picked up by ``@register_model`` below (it looks for ``default_cfgs`` in this module), so
# ``timm.models.get_pretrained_cfg(name)`` and ``timm.data.resolve_data_config`` know them.
default_cfgs = generate_default_cfgs({
    **{name: _cfg("stem.0") for name in (
        "convnext_atto_cvst", "convnext_tiny_cvst", "convnext_small_cvst", "convnext_base_cvst",
        "convnext_large_cvst")},
    "vit_small_cvst": _cfg("patch_embed.proj.0", classifier="head"),
    "vit_medium_cvst": _cfg("patch_embed.proj.0", classifier="head"),
    "vit_base_cvst": _cfg("patch_embed.proj.0", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          classifier="head"),
    "convnext_iso_small": _cfg("stem", classifier="head"),
    "convnext_iso_small_cvst": _cfg("stem.0", classifier="head"),
})


# ConvNeXt + ConvStem (Fig. 2; Table 8 C2 for ConvNeXt-B). Clean weights: Table 18.
@register_model
def convnext_tiny_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-T + ConvStem: two 3x3 stride-2 convolutions 3->48->96, each with LN and GELU."""
    return _build("convnext_tiny_cvst", "convnext_tiny", "table7:6", "convnext_tiny.fb_in1k",
                  pretrained, kwargs)


@register_model
def convnext_small_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-S + ConvStem: the ConvNeXt-T stem (3->48->96)."""
    return _build("convnext_small_cvst", "convnext_small", "table7:6", "convnext_small.fb_in1k",
                  pretrained, kwargs)


@register_model
def convnext_base_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-B + ConvStem: design C2 of Table 8 (64 s2, 96 s2, 128 s1)."""
    return _build("convnext_base_cvst", "convnext_base", "table8:C2", "convnext_base.fb_in1k",
                  pretrained, kwargs)


@register_model
def convnext_large_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-L + ConvStem: the ConvNeXt-B design C2 scaled to width 192 (96 s2, 144 s2,
    192 s1), as in the paper's published ConvNeXt-L checkpoint (RobustBench)."""
    return _build("convnext_large_cvst", "convnext_large", "k3s2c96LG-k3s2c144LG-k3s1cDLG",
                  "convnext_large.fb_in1k", pretrained, kwargs)


@register_model
def convnext_atto_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt-atto (3.7M) + a two-layer ConvStem 3->20->40: the small model of CPU runs."""
    return _build("convnext_atto_cvst", "convnext_atto", "k3s2c20LG-k3s2cDLG",
                  "convnext_atto.d2_in1k", pretrained, kwargs)


# ViT + ConvStem: Table 9 C1 (48-96-192-384, 3x3 stride 2) and a 1x1 projection to the width.
@register_model
def vit_small_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S/16 + ConvStem C1 (width 384); clean weights deit_small_patch16_224."""
    return _build("vit_small_cvst", "deit_small_patch16_224", "table9:C1",
                  "deit_small_patch16_224.fb_in1k", pretrained, kwargs)


@register_model
def vit_medium_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-M/16 + ConvStem C1 with a 1x1 projection to 512; clean weights deit3_medium."""
    return _build("vit_medium_cvst", "deit3_medium_patch16_224", "table9:C1",
                  "deit3_medium_patch16_224.fb_in1k", pretrained, kwargs)


@register_model
def vit_base_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-B/16 + ConvStem C1 with a 1x1 projection to 768; clean weights augreg_in1k."""
    return _build("vit_base_cvst", "vit_base_patch16_224", "table9:C1",
                  "vit_base_patch16_224.augreg_in1k", pretrained, kwargs)


# Isotropic ConvNeXt-S (18 blocks, width 384, 16x16 PatchStem) and its ConvStem variant (Table 9
# C1).
@register_model
def convnext_iso_small(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Isotropic ConvNeXt-S: 22.3M parameters."""
    return _iso_model("convnext_iso_small", None, pretrained, kwargs)


@register_model
def convnext_iso_small_cvst(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Isotropic ConvNeXt-S + ConvStem (the ViT-S ConvStem, C1 of Table 9)."""
    return _iso_model("convnext_iso_small_cvst", "table9:C1", pretrained, kwargs)


# The project's own names.
CONVSTEM_MODELS: tuple[str, ...] = (
    "convnext_atto_cvst", "convnext_tiny_cvst", "convnext_small_cvst", "convnext_base_cvst",
    "convnext_large_cvst", "vit_small_cvst",
    "vit_medium_cvst", "vit_base_cvst", "convnext_iso_small_cvst")
