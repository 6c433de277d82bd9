"""Table 14 of the paper: parameters and fvcore FLOPs at 224 of all 14 models.

Deviations from the printed table, where the table contradicts the architecture it describes
(the issue asks to follow the architecture and document the difference here):

* ConvNeXt-S: timm's ConvNeXt-S (the model of Table 18, ``convnext_small.fb_in1k``) has 50.22M
  parameters, not 50.10M.
* ConvNeXt-S + ConvStem: the ConvNeXt-T stem (3->48->96, the one the paper says it uses) adds
  0.04M to ConvNeXt-S, giving 50.26M, not 50.33M (the table's +0.23M).
* ViT-M + ConvStem is printed with one decimal (39.5): our 39.53M agrees to that precision.

FLOPs of all 14 rows are within 1% of the table as printed.
"""

from __future__ import annotations

import pytest
import timm

import raytrain_at.models  # noqa: F401 - registers the models
from raytrain_at.models import complexity
from raytrain_at.models.paper_tables import TABLE14

# Expected parameter counts (M) where the architecture as described differs from the table.
ARCHITECTURE_PARAMS = {"convnext_small": 50.22, "convnext_small_cvst": 50.26}


def _printed_precision(value: float) -> float:
    """Half a unit of the last printed digit (0.005 for 28.63, 0.05 for 39.5)."""
    decimals = len(f"{value}".split(".")[1].rstrip("0")) if "." in f"{value}" else 0
    return 0.5 * 10 ** -max(decimals, 1)


@pytest.mark.parametrize("name", list(TABLE14))
def test_params_and_flops_match_table14(name: str) -> None:
    row = TABLE14[name]
    size = complexity(timm.create_model(name, pretrained=False), 224)
    expected_params = ARCHITECTURE_PARAMS.get(name, row.params_m)
    tolerance = max(0.01, _printed_precision(expected_params))
    assert abs(size.params_m - expected_params) <= tolerance, (
        f"{name}: {size.params_m:.4f}M vs {expected_params}M")
    assert abs(size.flops_g - row.flops_g) / row.flops_g <= 0.01, (
        f"{name}: {size.flops_g:.3f}G vs {row.flops_g}G")


def test_table14_deviations_are_the_documented_ones() -> None:
    """The ConvNeXt-S rows really do differ from the printed table (so the exemption is needed)."""
    for name in ARCHITECTURE_PARAMS:
        size = complexity(timm.create_model(name, pretrained=False), 224)
        assert abs(size.params_m - TABLE14[name].params_m) > 0.01


def test_convstem_adds_what_the_stem_costs() -> None:
    """ConvNeXt-T: the ConvStem (43,200 params) replaces the 4x4 PatchStem (4,896 params)."""
    plain = sum(p.numel() for p in timm.create_model("convnext_tiny").parameters())
    cvst = sum(p.numel() for p in timm.create_model("convnext_tiny_cvst").parameters())
    assert cvst - plain == (3 * 9 * 48 + 48 + 2 * 48 + 48 * 9 * 96 + 96 + 2 * 96) - (
        3 * 16 * 96 + 96 + 2 * 96)
