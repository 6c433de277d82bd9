"""The bundled recipes: every one loads and validates, and the paper's facts are where they belong.

Paper: Singh, Croce, Hein, "Revisiting Adversarial Training for ImageNet" (2023). Section and table
numbers below refer to it. Loading a recipe never touches the dataset or checkpoint files: the
``$RAYTRAIN_AT_DATA`` / ``$RAYTRAIN_AT_CKPT`` references are expanded by the launcher, not here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm

import raytrain_at.models  # noqa: F401 - registers the project's timm models
from raytrain_at.config import RunConfig, available_recipes, load_config, resolve_recipe
from raytrain_at.config_loader import RECIPES
from raytrain_at.errors import UserError

EPS_4 = 4 / 255
EPS_8 = 8 / 255

# Table 2 rows marked 'ours', counted in the paper: small 7 (ViT-S, Isotropic-CN-S,
# Isotropic-CN-S + ConvStem, ViT-S + ConvStem, ConvNeXt-T, ConvNeXt-T + ConvStem 2 and 3 steps),
# medium 4 (ViT-M, ViT-M + ConvStem, ConvNeXt-S, ConvNeXt-S + ConvStem), large 7 (ViT-B 50,
# ViT-B + ConvStem 50 and 250, ConvNeXt-B 50, ConvNeXt-B + ConvStem 50, 250, and 250 with 3 steps).
TABLE2_OURS_ROWS = 7 + 4 + 7

TABLE1_ARCHS = ("convnext_tiny", "convnext_tiny_cvst", "convnext_iso_small",
                "convnext_iso_small_cvst", "vit_small", "vit_small_cvst")
CVST_MODELS = ("convnext_tiny_cvst", "convnext_small_cvst", "convnext_base_cvst", "vit_small_cvst",
               "vit_medium_cvst", "vit_base_cvst", "convnext_iso_small_cvst")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    """Point the path variables at an empty folder: loading must not need the files."""
    monkeypatch.setenv("RAYTRAIN_AT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RAYTRAIN_AT_CKPT", str(tmp_path / "ckpt"))


_CACHE: dict[str, RunConfig] = {}


def cfg(name: str) -> RunConfig:
    if name not in _CACHE:
        _CACHE[name] = load_config(name)
    return _CACHE[name]


def recipes(prefix: str) -> list[str]:
    return [n for n in available_recipes() if n.startswith(prefix)]


def imagenet_recipes() -> list[str]:
    """The paper recipes of this file (not quickstart or other additions)."""
    return [n for n in available_recipes() if n.startswith(("table", "clean_", "finetune_"))]


# ------------------------------------------------------------------------------ every recipe
@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads_and_validates(name):
    config = cfg(name)
    assert config.recipe == name
    assert timm.is_model(config.model.name), config.model.name
    # RunConfig checks this too; restated so a change of that check cannot let a recipe slip.
    per_worker, rest = divmod(config.schedule.global_batch_size, config.scaling.num_workers)
    assert rest == 0
    if config.aug.preset == "heavy":
        assert per_worker % 2 == 0, (name, per_worker)


def test_bases_are_not_listed_and_none_is_missing():
    names = available_recipes()
    assert not [n for n in names if n.startswith("_")]
    assert (RECIPES.bundled_dir() / "_imagenet.yaml").is_file()
    expected = (
        [f"table1_{a}_{row}" for a in TABLE1_ARCHS
         for row in ("random_basic", "pretrained_basic", "pretrained_heavy")]
        + ["table16_vit_small_cvst_3aug", "table16_convnext_tiny_cvst_3aug"]
        + [f"clean_{m}" for m in CVST_MODELS]
        + ["table11_convnext_tiny_cvst_50ep_1step", "table11_convnext_tiny_cvst_50ep_2step",
           "table12_convnext_tiny_50ep_pgd2", "finetune_8px_convnext_tiny_cvst",
           "finetune_8px_vit_small_cvst", "finetune_8px_convnext_base_cvst"])
    assert set(expected) <= set(names), sorted(set(expected) - set(names))


@pytest.mark.parametrize("name", imagenet_recipes())
def test_imagenet_recipes_share_the_paper_setup(name):
    c = cfg(name)
    assert c.model.num_classes == 1000 and c.data.resolution == 224
    assert c.data.train == "$RAYTRAIN_AT_DATA/imagenet_train.beton"
    assert c.data.heldout == "$RAYTRAIN_AT_DATA/imagenet_heldout4k.beton"
    assert c.scaling.use_gpu and c.tracking.experiment == (
        "clean-pretraining" if name.startswith("clean_") else "imagenet-at")
    # App. A.1: AdamW 0.9/0.95, wd 0.05, label smoothing 0.1 (plain CE without MixUp, as the
    # paper's code), EMA 0.9999 (Sec. 4.2 and the paper's code, not App. A.1's 0.999).
    assert c.optim.betas == (0.9, 0.95) and c.optim.weight_decay == 0.05
    mixup = c.aug.preset == "heavy" and (c.aug.mixup_alpha > 0 or c.aug.cutmix_alpha > 0)
    assert c.objective.label_smoothing == (0.1 if mixup else 0.0) and c.optim.ema_decay == 0.9999
    for value in (c.model.pretrained, c.model.init):  # no hard-coded local paths
        assert value is None or value.startswith(("hub:", "$RAYTRAIN_AT_CKPT/", "models:/",
                                                  "run:clean-pretraining/")), value
    if not name.startswith("clean_"):
        assert c.objective.kind == "adversarial" and c.attack.norm == "linf"
    if not name.startswith(("finetune_", "clean_")):
        assert math.isclose(c.attack.eps, EPS_4)
    if c.schedule.epochs >= 250:  # peak lr at epoch 20 for 250/300 epochs, else 10 (App. A.1)
        assert c.optim.warmup_epochs == 20
    elif not name.startswith("finetune_"):
        assert c.optim.warmup_epochs == 10


@pytest.mark.parametrize("name", imagenet_recipes())
def test_imagenet_recipes_feed_each_gpu_and_fit_the_clusters_nodes(name):
    """The dry run asks Ray for 12 CPUs and a GPU per worker, 11 of them decoding: at about 1k
    img/s per decoding core (BENCHMARKS.md) that meets the ~3.6k img/s a GPU eats, and a job of
    the recipe's workers fits one 8-GPU node of every GPU type in cluster.yaml."""
    import yaml

    from raytrain_at.dry_run import ray_resources

    c = cfg(name)
    resources = ray_resources(c)
    assert resources["per_worker"] == {"CPU": 12.0, "GPU": 1.0}, resources
    assert c.data.loader_workers == 11 and c.data.loader_workers < c.scaling.cpus_per_worker
    assert c.data.loader_workers * 1000 >= 3600
    cluster = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())
    gpu_nodes = [t["resources"] for t in cluster["available_node_types"].values()
                 if t["resources"].get("GPU")]
    assert gpu_nodes
    for node in gpu_nodes:
        assert resources["total"]["CPU"] <= node["CPU"] and resources["total"]["GPU"] <= node["GPU"]


# ------------------------------------------------------------------------------------ Table 2
def test_table2_has_one_recipe_per_ours_row():
    assert len(recipes("table2_")) == TABLE2_OURS_ROWS


def test_table2_convnext_tiny_cvst_3step():
    c = cfg("table2_convnext_tiny_cvst_300ep_3step")
    assert c.model.name == "convnext_tiny_cvst"
    assert c.schedule.epochs == 300 and c.attack.steps == 3
    assert c.schedule.global_batch_size == 1392 and c.optim.warmup_epochs == 20
    assert c.attack.kind == "apgd" and c.aug.preset == "heavy"
    assert c.model.init == "run:clean-pretraining/clean_convnext_tiny_cvst"


@pytest.mark.parametrize("name", recipes("table2_"))
def test_table2_rows(name):
    c = cfg(name)
    epochs, steps = name.split("_")[-2:]
    assert c.schedule.epochs == int(epochs.removesuffix("ep"))
    assert c.attack.steps == int(steps.removesuffix("step")) and c.attack.kind == "apgd"
    # App. A.3: every 'ours' model starts from clean ImageNet-1k weights, heavy augmentation.
    assert c.aug.preset == "heavy"
    assert (c.model.pretrained is None) != (c.model.init is None)
    if c.model.name.endswith("_cvst"):
        # The clean pre-training by its run's stable name: no file to copy, no variable to set.
        assert c.model.init == f"run:clean-pretraining/clean_{c.model.name}"
        clean = cfg(f"clean_{c.model.name}")
        assert (clean.tracking.experiment, clean.tracking.run_name) == (
            "clean-pretraining", f"clean_{c.model.name}")
    size = ("large" if "base" in c.model.name else
            "medium" if "medium" in c.model.name or "convnext_small" in c.model.name else "small")
    if size == "small":
        assert c.schedule.epochs == 300 and c.schedule.global_batch_size == 1392
        assert c.attack.heldout_steps == 1
    elif size == "medium":
        assert c.schedule.epochs == 50 and c.schedule.global_batch_size == 1024
        assert c.attack.heldout_steps == 10
    else:
        assert c.schedule.epochs in (50, 250) and c.attack.heldout_steps == 10
        expected = 864 if c.model.name.startswith("vit_base") else 756
        assert c.schedule.global_batch_size == expected


def test_table2_large_rows():
    large = [n for n in recipes("table2_") if "_base" in n]
    assert len(large) == 7
    assert {cfg(n).model.name for n in large} == {
        "vit_base_patch16_224", "vit_base_cvst", "convnext_base", "convnext_base_cvst"}


def test_table2_clean_weights_are_those_of_table18():
    expected = {"table2_convnext_tiny_300ep_2step": "hub:convnext_tiny.fb_in1k",
                "table2_vit_small_300ep_2step": "hub:deit_small_patch16_224.fb_in1k",
                "table2_vit_medium_50ep_2step": "hub:deit3_medium_patch16_224.fb_in1k",
                "table2_convnext_small_50ep_2step": "hub:convnext_small.fb_in1k",
                "table2_vit_base_50ep_2step": "hub:vit_base_patch16_224.augreg_in1k",
                "table2_convnext_base_50ep_2step": "hub:convnext_base.fb_in1k"}
    for name, weights in expected.items():
        assert cfg(name).model.pretrained == weights, name
    iso = cfg("table2_convnext_iso_small_300ep_2step").model
    assert iso.init == "$RAYTRAIN_AT_CKPT/convnext_iso_small_1k_224_ema.safetensors"
    assert cfg("table2_vit_medium_50ep_2step").model.name == "deit3_medium_patch16_224"


# ------------------------------------------------------------------------------------ Table 1
@pytest.mark.parametrize("arch", TABLE1_ARCHS)
def test_table1_rows(arch):
    random_basic = cfg(f"table1_{arch}_random_basic")
    pre_basic = cfg(f"table1_{arch}_pretrained_basic")
    pre_heavy = cfg(f"table1_{arch}_pretrained_heavy")
    for c in (random_basic, pre_basic, pre_heavy):
        assert c.schedule.epochs == 50 and c.schedule.global_batch_size == 1392
        assert c.attack.kind == "apgd" and c.attack.steps == 2
        assert c.model.name == random_basic.model.name
    assert random_basic.model.pretrained is None and random_basic.model.init is None
    assert random_basic.aug.preset == "basic"
    assert (pre_basic.model.pretrained or pre_basic.model.init) and pre_basic.aug.preset == "basic"
    assert pre_heavy.aug.preset == "heavy"
    assert (pre_heavy.model.pretrained, pre_heavy.model.init) == (pre_basic.model.pretrained,
                                                                  pre_basic.model.init)
    # The 4th row (50 -> 300 epochs) is the Table 2 recipe: the same run but for its length.
    longer = cfg(f"table2_{arch}_300ep_2step")
    assert longer.model == pre_heavy.model and longer.aug == pre_heavy.aug
    assert longer.schedule.epochs == 300 and longer.optim.warmup_epochs == 20


def test_table1_has_three_rows_per_architecture():
    assert len(recipes("table1_")) == 3 * len(TABLE1_ARCHS)


# ---------------------------------------------------------------------------- Tables 11, 12
def test_table11_attack_steps():
    one, two = cfg("table11_convnext_tiny_cvst_50ep_1step"), cfg("table11_convnext_tiny_cvst_50ep_2step")
    assert (one.attack.steps, two.attack.steps) == (1, 2)
    for c in (one, two):
        assert c.model.name == "convnext_tiny_cvst" and c.schedule.epochs == 50
        assert c.attack.kind == "apgd" and c.aug.preset == "heavy" and c.model.init


def test_table12_uses_pgd():
    c = cfg("table12_convnext_tiny_50ep_pgd2")
    assert c.attack.kind == "pgd" and c.attack.steps == 2
    assert c.model.name == "convnext_tiny" and c.schedule.epochs == 50
    assert c.model.pretrained == "hub:convnext_tiny.fb_in1k" and c.aug.preset == "heavy"


# ---------------------------------------------------------------------------------- App. A.5
@pytest.mark.parametrize("model", ["convnext_tiny_cvst", "vit_small_cvst", "convnext_base_cvst"])
def test_finetune_to_8px(model):
    c = cfg(f"finetune_8px_{model}")
    assert c.model.name == model
    assert math.isclose(c.attack.eps, EPS_8)
    assert c.schedule.epochs == 25 and math.isclose(c.optim.lr, 1e-4)
    assert c.optim.warmup_epochs == 5 and c.aug.preset == "heavy"
    assert c.model.init == f"$RAYTRAIN_AT_CKPT/{model}_4px.safetensors"
    assert c.model.pretrained is None


def test_finetune_accepts_a_registered_model():
    c = load_config("finetune_8px_convnext_base_cvst",
                    ["model.init=models:/convnext_base_cvst@champion-linf"])
    assert c.model.init == "models:/convnext_base_cvst@champion-linf"


# ---------------------------------------------------------------------------------- App. B.3
@pytest.mark.parametrize("model", CVST_MODELS)
def test_clean_pretraining_of_convstem_models(model):
    c = cfg(f"clean_{model}")
    assert c.model.name == model and c.model.init is None and c.model.pretrained
    assert c.objective.kind == "clean" and c.attack.kind == "none"
    assert c.aug.preset == "heavy"
    small = model in ("convnext_tiny_cvst", "vit_small_cvst", "convnext_iso_small_cvst")
    assert c.schedule.epochs == (100 if small else 50)  # Table 10
    if model == "convnext_iso_small_cvst":
        assert c.model.pretrained == "$RAYTRAIN_AT_CKPT/convnext_iso_small_1k_224_ema.safetensors"
    else:
        assert c.model.pretrained.startswith("hub:")


# ------------------------------------------------------------------------------- bad recipes
def test_unknown_key_in_a_recipe_is_named(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("base: table2_convnext_tiny_cvst_300ep_2step\noptim: {lrr: 1}\n")
    with pytest.raises(UserError, match=r"optim\.lrr"):
        load_config(str(path))


def test_child_recipe_overrides_only_what_it_names(tmp_path: Path):
    path = tmp_path / "child.yaml"
    path.write_text("base: table2_convnext_tiny_cvst_300ep_2step\noptim: {lr: 5.0e-4}\n")
    c = load_config(str(path))
    assert c.optim.lr == 5e-4 and c.optim.warmup_epochs == 20 and c.schedule.epochs == 300
    assert c.recipe == "child"


# ------------------------------------------------------------- values from the paper's code
def test_ema_decay_is_the_papers_code_value():
    """The appendix (A.1, A.2) says 0.999; Sec. 4.2 and the paper's code (timm ModelEmaV2,
    decay=0.9999) say 0.9999: every ImageNet run, clean pre-training and 8/255 fine-tunes
    included. The transfer runs keep 0.999 (App. D.6 follows [14]; ~1,000 steps in all)."""
    for name in available_recipes():
        c = cfg(name)
        if name.startswith("transfer_"):
            assert c.optim.ema_decay == 0.999, name
        elif name.startswith(("table", "clean_", "finetune_")):
            assert c.optim.ema_decay == 0.9999, name
    lines = (RECIPES.bundled_dir() / "_imagenet.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "ema_decay" in line)
    assert "paper's code" in lines[at - 1]  # the one-line reason stays with the value


def test_rows_without_mixup_train_with_plain_cross_entropy():
    """The paper's code uses plain cross-entropy when MixUp is off (label smoothing only rides
    on MixUp's soft targets): Table 1's basic rows and Table 16's 3-Aug rows."""
    plain = [n for n in available_recipes() if n.startswith(("table1_", "table16_"))
             and cfg(n).aug.preset in ("basic", "3aug")]
    assert len(plain) == 2 * len(TABLE1_ARCHS) + 2
    for name in plain:
        assert cfg(name).objective.label_smoothing == 0.0, name
        text = resolve_recipe(name).read_text()
        assert "plain cross-entropy when MixUp is off" in text, name
    for arch in TABLE1_ARCHS:
        assert cfg(f"table1_{arch}_pretrained_heavy").objective.label_smoothing == 0.1


# ------------------------------------------------------------------------------ Table 16
@pytest.mark.parametrize("arch", ["vit_small_cvst", "convnext_tiny_cvst"])
def test_table16_three_aug_rows(arch):
    """App. D.2: the 3-Aug rows are Table 1's clean-pre-trained rows with basic + flip +
    colour jitter; basic and heavy are Table 1's."""
    three = cfg(f"table16_{arch}_3aug")
    basic, heavy = cfg(f"table1_{arch}_pretrained_basic"), cfg(f"table1_{arch}_pretrained_heavy")
    assert three.aug.preset == "3aug" and three.objective.label_smoothing == 0.0
    assert three.model == heavy.model and three.schedule == heavy.schedule
    assert three.attack == heavy.attack and three.optim == heavy.optim
    assert three.model_copy(update={"aug": basic.aug, "recipe": None}) == \
        basic.model_copy(update={"recipe": None})


# ------------------------------------------------------------------------------ Table 15
TABLE15 = re.compile(r"raytrain-at train (\S+) --set model\.pretrained=hub:(\S+)")


def test_table15_overrides_are_documented_and_load():
    """Table 15 (App. D.1): the ImageNet-21k starting weights are one documented override of
    the ImageNet-1k row (ConvNeXt-T 50 and 300 epochs, ViT-B 50 epochs)."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    found = dict(TABLE15.findall(docs))
    assert set(found) == {"table1_convnext_tiny_pretrained_heavy",
                          "table2_convnext_tiny_300ep_2step", "table2_vit_base_50ep_2step"}
    for name, tag in found.items():
        base = cfg(name)
        override = load_config(name, [f"model.pretrained=hub:{tag}"])
        architecture, weights = tag.split(".")
        assert architecture == base.model.name and ("21k" in weights or "22k" in weights), tag
        assert tag in timm.list_pretrained(architecture), tag  # timm has these weights
        assert override.model_copy(update={"model": base.model}) == base


# -------------------------------------------------------------------------------- layout
def test_recipe_chains_have_at_most_two_levels():
    """A recipe is its own keys over at most one table base over _imagenet: readable without
    chasing a chain of recipes, and no base overrides another's value back."""
    for name in available_recipes():
        chain = [path.stem for path in RECIPES.chain(name)]
        assert len(chain) <= 3, chain
        assert all(stem.startswith("_") for stem in chain[1:]), chain
        if len(chain) == 3:
            assert chain[-1] == "_imagenet", chain


def test_recipes_show_fits_one_screen_and_loads_back():
    import yaml

    from raytrain_at.recipe_table import show_recipe

    for name in available_recipes():
        text = show_recipe(name)
        lines = text.splitlines()
        assert len(lines) <= 40 and max(map(len, lines)) <= 100, name
        assert f"# base chain: {name}" in text
        assert yaml.safe_load(text) == cfg(name).model_dump(mode="json"), name
