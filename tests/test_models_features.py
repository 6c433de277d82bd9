"""Pixel-space inputs, test-time resolution, small-input strides, clean-weight loading, errors."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import raytrain_at  # noqa: F401
from raytrain_at.errors import UserError
from raytrain_at.models import (create_robust_model, load_backbone_weights, set_test_resolution,
                                unwrap)

TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)


def test_models_normalise_inside() -> None:
    model = create_robust_model("convnext_tiny_cvst", num_classes=4, **TINY_CONVNEXT).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(model.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone((x - mean) / std), atol=1e-6)
    # Normalisation statistics are not weights: the state dict holds the backbone only.
    assert all(k.startswith("backbone.") for k in model.state_dict())


def test_vit_positional_embedding_interpolates_to_new_grid() -> None:
    model = create_robust_model("vit_small_cvst", num_classes=3, **TINY_VIT).eval()
    before = unwrap(model).pos_embed.detach().clone()
    set_test_resolution(unwrap(model), 288)
    after = unwrap(model).pos_embed
    assert after.shape == (1, 1 + 18 * 18, 64)
    assert torch.equal(after[:, :1], before[:, :1])  # class token position untouched
    assert model(torch.rand(1, 3, 288, 288)).shape == (1, 3)
    with pytest.raises(UserError, match="not a multiple of the ViT patch size 16"):
        set_test_resolution(unwrap(model), 300)


def test_convnext_runs_at_any_size_from_32() -> None:
    model = create_robust_model("convnext_tiny_cvst", num_classes=3, resolution=40,
                                **TINY_CONVNEXT)
    assert model(torch.rand(1, 3, 40, 40)).shape == (1, 3)
    with pytest.raises(UserError, match="below the minimum 32"):
        set_test_resolution(unwrap(model), 24)


def test_small_input_option_gives_cifar_sized_feature_maps() -> None:
    model = create_robust_model("convnext_tiny_cvst", num_classes=10, small_input=True,
                                **TINY_CONVNEXT)
    sides = [f.shape[-1] for f in unwrap(model).forward_intermediates(
        torch.rand(1, 3, 32, 32), intermediates_only=True)]
    assert sides == [32, 31, 15, 7]
    default = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    sides = [f.shape[-1] for f in unwrap(default).forward_intermediates(
        torch.rand(1, 3, 32, 32), intermediates_only=True)]
    assert sides == [8, 4, 2, 1]
    with pytest.raises(UserError, match="only defined for ConvNeXt"):
        create_robust_model("vit_small_cvst", small_input=True, **TINY_VIT)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_clean_weights_load_into_every_non_stem_parameter(tmp_path, suffix: str) -> None:
    clean = timm.create_model("convnext_tiny", num_classes=10, **TINY_CONVNEXT)
    path = tmp_path / f"clean{suffix}"
    state = {k: v.contiguous() for k, v in clean.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(
        {"state_dict": state}, path)
    model = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    fresh_stem = {k: v.clone() for k, v in unwrap(model).stem.state_dict().items()}
    report = load_backbone_weights(model, path, model_name="convnext_tiny_cvst")
    loaded = unwrap(model).state_dict()
    for key, value in state.items():
        if key.startswith("stem."):
            continue
        assert torch.equal(loaded[key], value), key
    for key, value in unwrap(model).stem.state_dict().items():
        assert torch.equal(value, fresh_stem[key])  # ConvStem stays freshly initialised
    assert sorted(report.skipped_stem) == ["stem.0.bias", "stem.0.weight", "stem.1.bias",
                                          "stem.1.weight"]
    assert report.missing == [] and report.unexpected == []


def test_pretrained_true_reads_a_local_file_through_timm(tmp_path) -> None:
    clean = timm.create_model("deit_small_patch16_224", num_classes=5, **TINY_VIT)
    path = tmp_path / "deit.safetensors"
    save_file(clean.state_dict(), str(path))
    backbone = timm.create_model("vit_small_cvst", pretrained=True, num_classes=5,
                                 pretrained_cfg_overlay=dict(file=str(path)), **TINY_VIT)
    assert torch.equal(backbone.blocks[1].mlp.fc2.weight, clean.blocks[1].mlp.fc2.weight)
    assert torch.equal(backbone.pos_embed, clean.pos_embed)
    assert not torch.equal(backbone.patch_embed.proj.convs()[-1].weight.flatten()[:8],
                           torch.zeros(8))


def test_pretrained_true_offline_says_how_to_use_a_local_file() -> None:
    with pytest.raises(UserError, match="local file"):
        timm.create_model("convnext_tiny_cvst", pretrained=True)


def test_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    other = timm.create_model("convnext_tiny", num_classes=10, depths=(1, 1, 1, 1),
                              dims=(24, 48, 96, 192))
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    model = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"does not fit convnext_tiny_cvst: \S+ has shape \[\d+"):
        load_backbone_weights(model, path)
    # Nothing was half-loaded.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_new_head_is_skipped_on_request(tmp_path) -> None:
    clean = timm.create_model("convnext_tiny", num_classes=1000, **TINY_CONVNEXT)
    path = tmp_path / "in1k.safetensors"
    save_file(clean.state_dict(), str(path))
    model = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    with pytest.raises(UserError, match=r"head\.fc\.(weight|bias) has shape"):
        load_backbone_weights(model, path)
    report = load_backbone_weights(model, path, skip_head=True)
    assert sorted(report.skipped_head) == ["head.fc.bias", "head.fc.weight"]


class _NotWeights:
    def __reduce__(self):  # a pickle that would run code if unpickled unsafely
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_never_executed(tmp_path, capsys) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _NotWeights()}, handle)
    model = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    with pytest.raises(UserError, match="cannot be read as weights"):
        load_backbone_weights(model, path)
    assert "unpickled!" not in capsys.readouterr().out


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(UserError, match=r"unknown model name 'convnext_tiny_cvsst' \(did you mean "
                                        r"convnext_tiny_cvst"):
        create_robust_model("convnext_tiny_cvsst")


def test_isotropic_convnext_structure() -> None:
    backbone = timm.create_model("convnext_iso_small")
    assert len(backbone.blocks) == 18 and backbone.embed_dim == 384
    assert backbone.stem.kernel_size == (16, 16) and backbone.stem.stride == (16, 16)
    cvst = timm.create_model("convnext_iso_small_cvst", num_classes=7)
    assert cvst(torch.rand(1, 3, 64, 64)).shape == (1, 7)


def test_head_is_kept_when_it_fits_and_skipped_when_it_does_not(tmp_path) -> None:
    clean = timm.create_model("convnext_tiny", num_classes=10, **TINY_CONVNEXT)
    path = tmp_path / "ten.safetensors"
    save_file(clean.state_dict(), str(path))
    same = create_robust_model("convnext_tiny_cvst", num_classes=10, **TINY_CONVNEXT)
    report = load_backbone_weights(same, path, skip_head="if_mismatched")
    assert report.skipped_head == []
    assert torch.equal(unwrap(same).head.fc.weight, clean.head.fc.weight)
    other = create_robust_model("convnext_tiny_cvst", num_classes=7, **TINY_CONVNEXT)
    report = load_backbone_weights(other, path, skip_head="if_mismatched")
    assert sorted(report.skipped_head) == ["head.fc.bias", "head.fc.weight"]
