"""Stem specs: every design of Tables 7, 8 and 9 builds and has the right output shape; bad specs
fail before any training with a message that names the bad part."""

from __future__ import annotations

import pytest
import timm
import torch

import raytrain_at  # noqa: F401
from raytrain_at.errors import UserError
from raytrain_at.models import create_robust_model, parse_stem, stem_spec_of, unwrap
from raytrain_at.models.stems import NAMED_STEMS, ConvStem, build_stem

TABLE7 = [f"table7:{i}" for i in range(1, 7)]
TABLE8 = ["table8:P1", "table8:C1", "table8:C2"]
TABLE9 = ["table9:P1"] + [f"table9:C{i}" for i in range(1, 6)]


@pytest.mark.parametrize("design,width,stride", [(d, 96, 4) for d in TABLE7]
                         + [(d, 128, 4) for d in TABLE8] + [(d, 384, 16) for d in TABLE9])
def test_named_design_output_shape(design: str, width: int, stride: int) -> None:
    stem = build_stem(design, stride=stride, width=width, model_name="test")
    out = stem(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, width, 224 // stride, 224 // stride)


@pytest.mark.parametrize("design", TABLE7)
def test_table7_designs_in_convnext_tiny(design: str) -> None:
    model = create_robust_model("convnext_tiny", num_classes=7, stem=design)
    assert stem_spec_of(unwrap(model)) == NAMED_STEMS[design]
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("design", TABLE8)
def test_table8_designs_in_convnext_base(design: str) -> None:
    backbone = timm.create_model("convnext_base_cvst", num_classes=5, stem=design,
                                 depths=(1, 1, 1, 1))
    assert backbone.stem.spec.text == NAMED_STEMS[design]
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("design", TABLE9)
def test_table9_designs_in_vit_small(design: str) -> None:
    backbone = timm.create_model("vit_small_cvst", num_classes=3, stem=design, depth=1,
                                 img_size=64)
    tokens = backbone.forward_features(torch.rand(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + 16, 384)
    assert backbone(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_width_placeholder_fits_every_vit_width() -> None:
    for name, width in [("vit_small_cvst", 384), ("vit_medium_cvst", 512), ("vit_base_cvst", 768)]:
        backbone = timm.create_model(name, depth=1)
        assert backbone.patch_embed.proj.convs()[-1].out_channels == width
        assert [c.out_channels for c in backbone.patch_embed.proj.convs()[:4]] == [48, 96, 192, 384]


def test_paper_stems_have_layernorm_and_gelu_after_each_conv() -> None:
    stem = timm.create_model("convnext_tiny_cvst").stem
    kinds = [type(m).__name__ for m in stem]
    assert kinds == ["Conv2d", "LayerNorm2d", "GELU", "Conv2d", "LayerNorm2d", "GELU"]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem.convs()] == [
        (3, 48, (3, 3), (2, 2)), (48, 96, (3, 3), (2, 2))]
    base = timm.create_model("convnext_base_cvst").stem
    assert [(c.out_channels, c.stride[0]) for c in base.convs()] == [(64, 2), (96, 2), (128, 1)]


def test_spec_round_trip_and_named_lookup() -> None:
    spec = parse_stem("table9:C4")
    assert spec.text == "k7s4c48LG-k3s2c96LG-k3s2c192LG-k3s1c384LG-k1s1cD"
    assert spec.total_stride == 16
    assert parse_stem(spec.text) == spec
    assert isinstance(build_stem(spec.text, stride=16, width=384, model_name="m"), ConvStem)


def test_any_model_accepts_a_stem_spec_through_timm() -> None:
    backbone = timm.create_model("convnext_tiny_cvst", stem="k5s2c32LG-k3s2cDLG",
                                 depths=(1, 1, 1, 1))
    assert [c.out_channels for c in backbone.stem.convs()] == [32, 96]


@pytest.mark.parametrize("spec,fragment", [
    ("", "empty"),
    ("k3s2c48LG-k3x2cDLG", "layer 2 'k3x2cDLG'"),
    ("k3s2c48LG-k3s3cDLG", "total stride 6"),
    ("k3s2c48LG-k3s2c64LG", "outputs 64 channels"),
    ("k2s4cD", "kernel 2 smaller than stride 4"),
    ("k3s2c0-k3s2cD", "zero kernel, stride or width"),
    ("table7:9", "unknown stem design 'table7:9'"),
    ("k3s2c48LGX-k3s2cD", "layer 1"),
])
def test_bad_specs_fail_with_message_naming_the_part(spec: str, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        create_robust_model("convnext_tiny", stem=spec)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_vit_stem_must_reach_patch_stride() -> None:
    with pytest.raises(UserError, match="total stride 8 does not fit vit_small_cvst, which needs 16"):
        timm.create_model("vit_small_cvst", stem="k3s2c48LG-k3s2c96LG-k3s2cD")
