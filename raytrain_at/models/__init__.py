"""Models: ConvStem variants registered with timm, stems as data, weights, complexity.

``create_robust_model`` is the one way the project builds a model: timm's registry by name, an
optional stem spec, optional starting weights, wrapped so it takes [0, 1] pixels and normalises
as those weights were trained.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, cast

import timm
import torch.nn as nn

from raytrain_at.errors import UserError
from raytrain_at.models import zoo  # noqa: F401 - registers the *_cvst models with timm
from raytrain_at.models.backbones import (adapter_for, replace_stem, set_test_resolution,
                                          stem_spec_of, use_small_input_strides)
from raytrain_at.models.complexity import Complexity, complexity, count_flops, count_params
from raytrain_at.models.pixel_space import PixelSpaceClassifier, unwrap
from raytrain_at.models.zoo import CONVSTEM_MODELS
from raytrain_at.models.stems import NAMED_STEMS, parse_stem, validate_stem
from raytrain_at.models.weights import LoadReport, load_backbone_weights

__all__ = [
    "CONVSTEM_MODELS", "NAMED_STEMS", "Complexity", "LoadReport",
    "PixelSpaceClassifier", "adapter_for", "build_robust_model", "complexity", "count_flops",
    "count_params", "create_robust_model", "load_backbone_weights", "parse_stem", "replace_stem",
    "set_test_resolution", "stem_spec_of", "unwrap", "use_small_input_strides", "validate_stem",
    "with_normalisation",
]


def create_robust_model(name: str, *, num_classes: int = 1000, stem: str | None = None,
                        weights: str | Path | None = None, skip_head: bool | str = False,
                        small_input: bool = False, resolution: int | None = None,
                        **timm_kwargs: Any) -> PixelSpaceClassifier:
    """Build a model by timm name that takes images in [0, 1].

    Args:
        name: a timm model name, e.g. ``convnext_tiny_cvst`` or timm's ``convnext_tiny``.
        num_classes: classifier outputs.
        stem: a stem spec or design name (see :mod:`raytrain_at.models.stems`); replaces the
            model's default stem, for any supported backbone including timm's PatchStem models.
        weights: a starting checkpoint (local file or ``hub:name.tag``; an MLflow reference is
            fetched first by :func:`raytrain_at.model_refs.local_weights`) for
            every parameter but a replaced stem and, with ``skip_head``, the classifier; the
            model then normalises as those weights were trained (their origin's mean / std).
        skip_head: do not load the classifier from ``weights`` (new label set).
        small_input: stride-1 stem and first downsampling for 32x32 images (ConvNeXt only).
        resolution: test-time input side (ViT positional embeddings are resampled).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Raises:
        UserError: unknown name, bad stem spec, or a checkpoint that does not fit.
    """
    return build_robust_model(name, num_classes=num_classes, stem=stem, weights=weights,
                              skip_head=skip_head, small_input=small_input,
                              resolution=resolution, **timm_kwargs)[0]


def build_robust_model(name: str, *, num_classes: int = 1000, stem: str | None = None,
                       weights: str | Path | None = None, skip_head: bool | str = False,
                       small_input: bool = False, resolution: int | None = None,
                       **timm_kwargs: Any) -> tuple[PixelSpaceClassifier, LoadReport | None]:
    """:func:`create_robust_model`, with the report of its weight load (None without weights)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model name {name!r}{hint}")
    own = name in CONVSTEM_MODELS or name in ("convnext_iso_small",)
    kwargs = dict(timm_kwargs, num_classes=num_classes)
    if own:
        kwargs.update(stem=stem, small_input=small_input)
    try:
        backbone = timm.create_model(name, pretrained=False, **kwargs)
    except UserError:
        raise
    except TypeError as exc:
        raise UserError(f"model {name!r} rejected an option: {exc}") from None
    if not own:
        if stem is not None:
            replace_stem(backbone, stem, name)
        if small_input:
            use_small_input_strides(backbone)
    report = None
    if weights is not None:
        report = load_backbone_weights(backbone, weights, model_name=name, skip_head=skip_head)
    if resolution is not None:
        set_test_resolution(backbone, resolution)
    return with_normalisation(backbone, report), report


def with_normalisation(backbone: nn.Module, report: LoadReport | None) -> PixelSpaceClassifier:
    """``backbone`` wrapped to take [0, 1] pixels, normalised as its weights were trained: with
    the mean / std of their origin when the load says (DeiT, a timm tag, RobustBench, a model
    file), else with the backbone's timm cfg. The cfg is updated to match, so timm's data config
    of the backbone agrees with the wrapper."""
    cfg = dict(cast("dict[str, Any]", backbone.pretrained_cfg))  # timm's, typed Tensor | Module
    if report is not None and report.mean is not None and report.std is not None:
        cfg.update(mean=tuple(report.mean), std=tuple(report.std))
        backbone.pretrained_cfg = backbone.default_cfg = cfg  # pyright: ignore[reportArgumentType]
    return PixelSpaceClassifier(backbone, mean=cfg["mean"], std=cfg["std"])
