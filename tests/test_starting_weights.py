"""Starting weights load exactly, in every layout the recipes name, or fail in one line naming
the first keys and the checkpoint; a model normalises as its starting weights were trained.

Every checkpoint here is made by the test, in its source's own layout: the original ConvNeXt
repository's isotropic models (``dwconv`` / ``pwconv1`` / ``pwconv2``, written out below from its
model definition, with a reference forward pass), the DeiT repository's ``model`` container,
timm's state dicts and Hugging Face hub cache (offline), and the project's model files.
"""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import raytrain_at.models  # noqa: F401 - registers the models
from raytrain_at.config import load_config
from raytrain_at.errors import UserError
from raytrain_at.models import build_robust_model, load_backbone_weights, unwrap
from raytrain_at.models.model_files import ModelSpec, save_model_file
from raytrain_at.models.pixel_space import normalisation_of
from raytrain_at.registry.register import registration_payload
from raytrain_at.training.launch import run_params
from raytrain_at.training.loop import build_model, build_model_and_report, run_model_spec
from tests.support.cli_runner import run_cli

IMAGENET = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)
TINY_ISO = dict(depth=2, dim=32)


def _close(stats, expected) -> bool:
    return all(abs(a - b) < 1e-6 for got, want in zip(stats, expected)
               for a, b in zip(got, want, strict=True))


# ----------------------------------------------------------- the ConvNeXt repository's layout
def _iso_repository_state(depth: int, dim: int, num_classes: int = 1000, patch: int = 16,
                          layer_scale: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """What ``ConvNeXtIsotropic(depth, dim).state_dict()`` of facebookresearch/ConvNeXt holds
    (models/convnext_isotropic.py: ``stem`` conv, ``blocks.N`` of ``dwconv`` (7x7 depthwise),
    ``norm``, ``pwconv1`` / ``pwconv2`` (Linear, 4x), ``gamma`` only with layer scale, then
    ``norm`` and ``head``), filled with random values so that no mix-up can hide."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {"stem.weight": rand(dim, 3, patch, patch), "stem.bias": rand(dim)}
    for i in range(depth):
        block = {"dwconv.weight": rand(dim, 1, 7, 7), "dwconv.bias": rand(dim),
                 "norm.weight": 1 + rand(dim), "norm.bias": rand(dim),
                 "pwconv1.weight": rand(4 * dim, dim), "pwconv1.bias": rand(4 * dim),
                 "pwconv2.weight": rand(dim, 4 * dim), "pwconv2.bias": rand(dim)}
        if layer_scale:
            block["gamma"] = 1 + rand(dim)
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    state.update({"norm.weight": 1 + rand(dim), "norm.bias": rand(dim),
                  "head.weight": rand(num_classes, dim), "head.bias": rand(num_classes)})
    return state


def _iso_repository_forward(state: dict[str, torch.Tensor], x: torch.Tensor,
                            depth: int) -> torch.Tensor:
    """The repository's forward pass on normalised input, written from its definition."""
    patch = state["stem.weight"].shape[-1]
    x = F.conv2d(x, state["stem.weight"], state["stem.bias"], stride=patch)
    dim = x.shape[1]
    for i in range(depth):
        p = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.conv2d(x, p["dwconv.weight"], p["dwconv.bias"], padding=3, groups=dim)
        y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, (dim,), p["norm.weight"], p["norm.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p["pwconv1.weight"], p["pwconv1.bias"])),
                     p["pwconv2.weight"], p["pwconv2.bias"])
        if "gamma" in p:
            y = p["gamma"] * y
        x = x + y.permute(0, 3, 1, 2)
    x = F.layer_norm(x.mean(dim=(2, 3)), (dim,), state["norm.weight"], state["norm.bias"],
                     eps=1e-6)
    return F.linear(x, state["head.weight"], state["head.bias"])


_OURS = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}


def _our_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "blocks" and parts[2] in _OURS:
        return ".".join([*parts[:2], _OURS[parts[2]], *parts[3:]])
    return key


@pytest.fixture(scope="module")
def iso_repository_checkpoint(tmp_path_factory):
    """convnext_iso_small_1k_224_ema.pth as the repository publishes it: {'model': state}."""
    state = _iso_repository_state(depth=18, dim=384)
    path = tmp_path_factory.mktemp("iso") / "convnext_iso_small_1k_224_ema.pth"
    torch.save({"model": state}, path)
    return path, state


def test_convnext_repository_isotropic_checkpoint_loads_every_tensor(
        iso_repository_checkpoint) -> None:
    path, state = iso_repository_checkpoint
    model, report = build_robust_model("convnext_iso_small", weights=path)
    loaded = unwrap(model).state_dict()
    assert set(loaded) == {_our_key(k) for k in state}
    for key, value in state.items():
        assert torch.equal(loaded[_our_key(key)], value), key
    assert report is not None and report.layout == "convnext-isotropic"
    assert report.loaded == report.total == len(state) and report.fresh == []
    assert {m: c.matched for m, c in report.modules.items()}["blocks.17"] == 8
    # The same function as the repository's network, normalised with ImageNet's mean / std.
    assert _close(normalisation_of(model), IMAGENET)
    x = torch.rand(2, 3, 64, 64)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in IMAGENET)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x),
                                   _iso_repository_forward(state, (x - mean) / std, 18),
                                   rtol=1e-4, atol=1e-4)


def test_a_renamed_block_fails_in_one_line_naming_keys_and_checkpoint(tmp_path) -> None:
    state = _iso_repository_state(depth=18, dim=384)
    renamed = {k.replace("blocks.7.dwconv.", "blocks.7.dw_conv."): v for k, v in state.items()}
    path = tmp_path / "renamed.pth"
    torch.save({"model": renamed}, path)
    model, _ = build_robust_model("convnext_iso_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as error:
        load_backbone_weights(model, path, model_name="convnext_iso_small")
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert ("does not fit convnext_iso_small: 2 model tensors are not in it "
            "(blocks.7.conv_dw.weight, blocks.7.conv_dw.bias); 2 of its tensors are not in the "
            "model (blocks.7.dw_conv.weight, blocks.7.dw_conv.bias)") in message
    # Nothing was half-loaded.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_renamed_block_stops_train_before_ray_starts(tmp_path) -> None:
    """`raytrain-at train` with such a checkpoint, as a user runs it: one line on the console,
    exit code 2, no Ray session, no run."""
    state = _iso_repository_state(depth=18, dim=384)
    state = {k.replace("blocks.3.pwconv2.", "blocks.3.pw_conv2."): v for k, v in state.items()}
    path = tmp_path / "renamed.pth"
    torch.save({"model": state}, path)
    env = dict(os.environ, RAYTRAIN_AT_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               RAY_TMPDIR=str(tmp_path / "ray"))
    result = run_cli(["train", "quickstart", "--set", "model.name=convnext_iso_small",
                      "--set", f"model.pretrained={path}"], env=env, cwd=tmp_path, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), result.stderr[-2000:]
    assert "blocks.3.mlp.fc2.weight" in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "home" / "runs").exists() and not (tmp_path / "ray").exists()


def test_layer_scale_is_off_unless_the_recipe_asks(tmp_path) -> None:
    """A repository checkpoint with layer scale needs ``model.layer_scale``; without it the
    gammas are named (they would otherwise be dropped, changing the network)."""
    state = _iso_repository_state(depth=2, dim=32, num_classes=10, layer_scale=True)
    path = tmp_path / "with_gamma.pth"
    torch.save({"model": state}, path)
    with pytest.raises(UserError, match=r"blocks\.0\.gamma.*layer scale\? \(model\.layer_scale\)"):
        build_robust_model("convnext_iso_small", num_classes=10, weights=path, **TINY_ISO)
    model, report = build_robust_model("convnext_iso_small", num_classes=10, weights=path,
                                       ls_init_value=1.0, **TINY_ISO)
    assert report is not None and report.loaded == len(state)
    x = torch.rand(1, 3, 32, 32)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in IMAGENET)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x),
                                   _iso_repository_forward(state, (x - mean) / std, 2))
    config = load_config("quickstart", ["model.name=convnext_iso_small", "model.layer_scale=1e-6"])
    assert all(b.gamma is not None for b in unwrap(build_model(config)).blocks)
    assert all(b.gamma is None for b in unwrap(build_model(
        load_config("quickstart", ["model.name=convnext_iso_small"]))).blocks)


# --------------------------------------------------------------------- P1: the own PatchStem
@pytest.mark.parametrize("clean_name,ours,design,kwargs", [
    ("convnext_tiny", "convnext_tiny_cvst", "table7:1", TINY_CONVNEXT),
    ("convnext_base", "convnext_base_cvst", "table8:P1", TINY_CONVNEXT),
    ("deit_small_patch16_224", "vit_small_cvst", "table9:P1", TINY_VIT),
    ("convnext_iso_small", "convnext_iso_small_cvst", "k16s16cD", TINY_ISO),
])
def test_patchstem_designs_start_from_the_pretrained_patchstem(tmp_path, clean_name, ours,
                                                               design, kwargs) -> None:
    """Table 7 row 1, Table 8 P1, Table 9 P1: the ConvStem model with the backbone's own
    PatchStem design and the clean checkpoint is the clean network itself, stem included."""
    clean = timm.create_model(clean_name, num_classes=10, **kwargs).eval()
    path = tmp_path / "clean.safetensors"
    save_file({k: v.contiguous() for k, v in clean.state_dict().items()}, str(path))
    model, report = build_robust_model(ours, num_classes=10, stem=design, weights=path,
                                       **kwargs)
    assert report is not None and report.fresh == [] and report.loaded == report.total
    side = 224 if "deit" in clean_name else 64
    x = torch.rand(2, 3, side, side)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in normalisation_of(model))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), clean((x - mean) / std))


@pytest.mark.parametrize("clean_name,ours,design,kwargs,stem", [
    ("convnext_tiny", "convnext_tiny_cvst", "table7:2", TINY_CONVNEXT, "stem"),
    ("deit_small_patch16_224", "vit_small_cvst", "table9:C3", TINY_VIT, "patch_embed.proj"),
])
def test_other_designs_keep_a_fresh_stem(tmp_path, clean_name, ours, design, kwargs,
                                         stem) -> None:
    clean = timm.create_model(clean_name, num_classes=10, **kwargs)
    path = tmp_path / "clean.safetensors"
    save_file({k: v.contiguous() for k, v in clean.state_dict().items()}, str(path))
    torch.manual_seed(3)
    fresh, _ = build_robust_model(ours, num_classes=10, stem=design, **kwargs)
    torch.manual_seed(3)
    model, report = build_robust_model(ours, num_classes=10, stem=design, weights=path,
                                       **kwargs)
    assert report is not None and report.fresh_modules() == [stem]
    assert report.loaded == report.total - len(report.fresh) and report.missing == []
    for key, value in unwrap(model).state_dict().items():
        same = torch.equal(value, unwrap(fresh).state_dict()[key])
        assert same if key.startswith(stem + ".") else torch.equal(value,
                                                                   clean.state_dict()[key]), key


# ------------------------------------------------------------------------ normalisation
def _deit_state(**kwargs) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in timm.create_model(
        "deit_small_patch16_224", num_classes=5, **kwargs).state_dict().items()}


def test_a_deit_checkpoint_normalises_with_imagenet_statistics(tmp_path) -> None:
    """The ViT-S rows' model name is timm's vit_small_patch16_224 (cfg: mean = std = 0.5); DeiT
    trained with ImageNet's mean / std, and that is what the model must apply."""
    state = _deit_state(**TINY_VIT)
    deit = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    torch.save({"model": state}, deit)  # the DeiT repository's format
    model, report = build_robust_model("vit_small_patch16_224", num_classes=5, weights=deit,
                                       **TINY_VIT)
    assert report is not None and report.layout == "deit"
    assert _close(normalisation_of(model), IMAGENET)
    assert _close((model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]),
                  IMAGENET)
    # The same tensors as a plain file say nothing of their origin: the model's cfg applies...
    plain = tmp_path / "weights.safetensors"
    save_file(state, str(plain))
    model, _ = build_robust_model("vit_small_patch16_224", num_classes=5, weights=plain,
                                  **TINY_VIT)
    assert _close(normalisation_of(model), HALF)
    # ... unless timm's hub config.json sits beside them (a downloaded hub snapshot).
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "deit_small_patch16_224",
                                                      "pretrained_cfg": {
                                                          "mean": list(IMAGENET[0]),
                                                          "std": list(IMAGENET[1])}}))
    model, _ = build_robust_model("vit_small_patch16_224", num_classes=5, weights=plain,
                                  **TINY_VIT)
    assert _close(normalisation_of(model), IMAGENET)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache that timm reads with the hub offline: ``put(tag, model)`` seeds
    ``models--timm--TAG`` with that model's weights."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))

    def put(tag: str, model: torch.nn.Module) -> None:
        repo = cache / f"models--timm--{tag}"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(snapshot / "model.safetensors"))

    return put


def test_vit_s_rows_start_from_deit_with_imagenet_normalisation(offline_hub, tmp_path) -> None:
    """The recipe's ``hub:deit_small_patch16_224.fb_in1k`` through timm's own hub loading: every
    tensor loads, the model normalises with the tag's ImageNet statistics, and the model file
    of the run records them."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224")
    offline_hub("deit_small_patch16_224.fb_in1k", deit)
    config = load_config("table1_vit_small_pretrained_basic")
    assert config.model.name == "vit_small_patch16_224"
    model, report = build_model_and_report(config)
    assert report is not None and report.loaded == report.total
    assert report.normalisation_from == "timm cfg of deit_small_patch16_224.fb_in1k"
    assert torch.equal(unwrap(model).blocks[11].mlp.fc2.weight, deit.blocks[11].mlp.fc2.weight)
    stats = normalisation_of(model)
    assert _close(stats, IMAGENET)
    spec = run_model_spec(config, stats)
    assert _close((spec.mean, spec.std), IMAGENET)
    assert _close(normalisation_of(spec.build()), IMAGENET)  # what evaluate / register rebuild
    # ... and what a registered version of the run's model shows (its model_spec tag).
    path = save_model_file(tmp_path / "model.safetensors", model, spec)
    _, _, tags, _ = registration_payload(path, None, str(path))
    registered = json.loads(tags["model_spec"])
    assert _close((registered["mean"], registered["std"]), IMAGENET)
    params = run_params(config, report)
    assert params["init.matched"] == params["init.total"] == str(len(deit.state_dict()))
    assert params["init.layout"] == "timm" and params["init.fresh"] == "none"


@pytest.mark.slow  # the full-size ConvNeXt-T, ViT-M, ViT-B weights: about 60 s on 2 cores
@pytest.mark.parametrize("recipe,tag,base,expected", [
    ("table2_convnext_tiny_300ep_2step", "convnext_tiny.fb_in1k", "convnext_tiny", IMAGENET),
    ("table2_vit_medium_50ep_2step", "deit3_medium_patch16_224.fb_in1k",
     "deit3_medium_patch16_224", IMAGENET),
    ("table2_vit_base_50ep_2step", "vit_base_patch16_224.augreg_in1k", "vit_base_patch16_224",
     HALF),
    ("clean_vit_base_cvst", "vit_base_patch16_224.augreg_in1k", "vit_base_patch16_224", HALF),
])
def test_hub_recipe_families_normalise_as_their_tag(offline_hub, recipe, tag, base,
                                                    expected) -> None:
    offline_hub(tag, timm.create_model(base))
    config = load_config(recipe)
    assert config.model.pretrained == f"hub:{tag}"
    model, report = build_model_and_report(config)
    assert report is not None and report.missing == [] and report.unexpected == []
    assert _close(normalisation_of(model), expected)


@pytest.mark.parametrize("recipe,key", [
    ("table1_convnext_iso_small_pretrained_basic", "init"),  # the whole network
    ("clean_convnext_iso_small_cvst", "pretrained"),  # all but the stem (App. B)
])
def test_isotropic_rows_normalise_as_the_convnext_repository(iso_repository_checkpoint, recipe,
                                                             key) -> None:
    """The isotropic recipes name the repository's checkpoint as $RAYTRAIN_AT_CKPT/...; a
    converted .safetensors of it keeps the repository's key names."""
    path, state = iso_repository_checkpoint
    converted = path.parent / "convnext_iso_small_1k_224_ema.safetensors"
    save_file(state, str(converted))
    config = load_config(recipe)
    source = getattr(config.model, key)
    assert source == "$RAYTRAIN_AT_CKPT/convnext_iso_small_1k_224_ema.safetensors"
    setattr(config.model, key, str(converted))
    model, report = build_model_and_report(config)
    assert report is not None and report.layout == "convnext-isotropic"
    assert report.missing == [] and report.unexpected == []
    assert report.fresh_modules() == ([] if key == "init" else ["stem"])
    assert _close(normalisation_of(model), IMAGENET)


@pytest.mark.parametrize("recipe,stats", [
    ("transfer_cifar10_convnext_tiny_cvst", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
    ("finetune_8px_vit_small_cvst", IMAGENET),
])
def test_runs_from_a_model_file_keep_its_normalisation(tmp_path, recipe, stats) -> None:
    """Transfer and 8/255 fine-tuning start from a model file (e.g. an imported RobustBench
    model: raw pixels for ConvNeXt, ImageNet's statistics for ViT-S): the run's model applies
    the file's normalisation and its own model files record it."""
    config = load_config(recipe)
    spec = ModelSpec(name=config.model.name, num_classes=1000, mean=stats[0], std=stats[1])
    path = save_model_file(tmp_path / "start.safetensors", spec.build(), spec)
    config.model.init = str(path)
    model, report = build_model_and_report(config)
    assert report is not None and report.layout == "model-file"
    assert report.missing == [] and report.fresh_modules() == (
        ["head.fc"] if config.model.new_head else [])
    assert _close(normalisation_of(model), stats)
    recorded = run_model_spec(config, normalisation_of(model))
    assert _close((recorded.mean, recorded.std), stats)
