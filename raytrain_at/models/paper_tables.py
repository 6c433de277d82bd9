"""Reference figures from the paper (Singh, Croce, Hein 2023), used by the quickstart and tests.

Table 14: FLOPs (G, fvcore) and parameters (M) at 224x224, keyed by timm model name.
Tables 7, 8 and 9: fvcore FLOPs (G) at 224x224 of each stem design in its backbone, keyed by the
design's name in :data:`raytrain_at.models.stems.NAMED_STEMS`.
"""

from __future__ import annotations

from typing import NamedTuple


class SizeRow(NamedTuple):
    label: str
    flops_g: float
    params_m: float


TABLE14: dict[str, SizeRow] = {
    "convnext_tiny": SizeRow("ConvNeXt-T", 4.47, 28.59),
    "convnext_tiny_cvst": SizeRow("ConvNeXt-T + ConvStem", 4.60, 28.63),
    "convnext_iso_small": SizeRow("Isotropic ConvNeXt-S", 4.29, 22.31),
    "convnext_iso_small_cvst": SizeRow("Isotropic ConvNeXt-S + ConvStem", 4.67, 23.04),
    "vit_small_patch16_224": SizeRow("ViT-S-16", 4.61, 22.05),
    "vit_small_cvst": SizeRow("ViT-S-16 + ConvStem", 4.99, 22.78),
    "deit3_medium_patch16_224": SizeRow("ViT-M-16", 8.01, 38.85),
    "vit_medium_cvst": SizeRow("ViT-M-16 + ConvStem", 8.38, 39.5),
    "convnext_small": SizeRow("ConvNeXt-S", 8.70, 50.10),
    "convnext_small_cvst": SizeRow("ConvNeXt-S + ConvStem", 8.79, 50.33),
    "vit_base_patch16_224": SizeRow("ViT-B-16", 17.58, 86.57),
    "vit_base_cvst": SizeRow("ViT-B-16 + ConvStem", 17.93, 87.14),
    "convnext_base": SizeRow("ConvNeXt-B", 15.38, 88.59),
    "convnext_base_cvst": SizeRow("ConvNeXt-B + ConvStem", 15.97, 88.75),
}


# (backbone, design) -> printed FLOPs (G). Table 7 (ConvNeXt-T) and Table 9 (ViT-S) print a
# FLOPs column; Table 8 (ConvNeXt-B) does not, but its P1 (the PatchStem) and C2 (the paper's
# ConvNeXt-B ConvStem) are the ConvNeXt-B rows of Table 14. C1 has no printed figure.
STEM_FLOPS: dict[str, tuple[str, float]] = {
    "table7:1": ("convnext_tiny", 4.49),
    "table7:2": ("convnext_tiny", 4.50),
    "table7:3": ("convnext_tiny", 4.63),
    "table7:4": ("convnext_tiny", 4.66),
    "table7:5": ("convnext_tiny", 4.62),
    "table7:6": ("convnext_tiny", 4.59),
    "table8:P1": ("convnext_base", 15.38),
    "table8:C2": ("convnext_base", 15.97),
    "table9:P1": ("vit_small_patch16_224", 4.61),
    "table9:C1": ("vit_small_patch16_224", 4.99),
    "table9:C2": ("vit_small_patch16_224", 4.71),
    "table9:C3": ("vit_small_patch16_224", 4.78),
    "table9:C4": ("vit_small_patch16_224", 4.84),
    "table9:C5": ("vit_small_patch16_224", 4.81),
}
