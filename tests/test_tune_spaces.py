"""Ray Tune search spaces (tune_spaces/*.yaml): every bundled space validates against its recipe,
the paper's ablations are where they belong, and mistakes fail at load time with a one-line
UserError naming the file and the culprit, before any trial could start.

Paper: Singh, Croce, Hein, "Revisiting Adversarial Training for ImageNet" (2023): Tables 7, 8, 9
(ConvStem designs), Table 11 / Sec. 5 (attack steps), Table 17 (weight decay x label smoothing).
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path

import pytest
import torch
import yaml

from raytrain_at.config import RunConfig, flatten, load_config
from raytrain_at.config_loader import RECIPES, deep_merge, nest
from raytrain_at.errors import UserError
from raytrain_at.models import NAMED_STEMS, create_robust_model
from raytrain_at.tuning import METRIC_MODES, SearchSpace, load_space
from raytrain_at.tuning.spaces import available_spaces, spaces_dir

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "raytrain_at" / "tune_spaces"  # the checkout's tune_spaces/ links here
REQUIRED = ("table7_convnext_tiny_stems", "table8_convnext_base_stems", "table9_vit_small_stems",
            "table17_wd_ls_grid", "attack_steps", "radius_schedules", "quick_stems_cpu")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    """Recipes reference $RAYTRAIN_AT_DATA / $RAYTRAIN_AT_CKPT: loading must not need the files."""
    monkeypatch.setenv("RAYTRAIN_AT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RAYTRAIN_AT_CKPT", str(tmp_path / "ckpt"))


@functools.cache
def _bundled(name: str) -> SearchSpace:
    """A bundled space, loaded once per session (the tests only read it)."""
    return load_space(SPACES / f"{name}.yaml")


def _write(tmp_path: Path, **fields) -> Path:
    """A space file: a valid small quickstart space, with ``fields`` replacing its entries."""
    data = {"description": "test space", "recipe": "quickstart",
            "fixed": {"schedule.epochs": 3},
            "search": {"model.stem": {"grid": ["table7:1", "table7:6"]}},
            "metric": "heldout_robust_accuracy", "mode": "max",
            "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2}}
    data.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the bundled spaces
def test_required_spaces_exist() -> None:
    present = {p.stem for p in SPACES.glob("*.yaml")}
    assert set(REQUIRED) <= present, f"missing: {set(REQUIRED) - present}"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_space_loads_and_validates(path: Path) -> None:
    space = _bundled(path.stem)
    assert space.name == path.stem and space.source == path
    assert space.description and space.flat_keys()
    assert space.metric in METRIC_MODES and space.mode == METRIC_MODES[space.metric]
    # Every grid point is a valid trial config, and each sampled key lands in it.
    grids = {k: d.grid for k, d in space.search.items() if d.grid is not None}
    assert space.grid_size() == len(list(itertools.product(*grids.values())))
    for combo in itertools.product(*grids.values()):
        sample = dict(zip(grids, combo))
        flat = flatten(space.trial_config(sample))
        assert all(flat[k] == v for k, v in sample.items())
        assert all(flat[k] == v for k, v in space.fixed.items())
    if space.scheduler.kind == "asha":
        assert space.scheduler.grace_period < space.scheduler_max_t()


def test_space_by_name_from_any_directory(tmp_path, monkeypatch) -> None:
    # Not under the checkout: names resolve to the package's bundled spaces.
    monkeypatch.chdir(tmp_path)
    assert spaces_dir() == SPACES
    assert (ROOT / "tune_spaces").resolve() == SPACES  # the documented path still works
    assert set(REQUIRED) <= set(available_spaces())
    assert load_space("attack_steps").source == SPACES / "attack_steps.yaml"
    with pytest.raises(UserError, match=r"unknown search space 'atack_steps'.*did you mean "
                                        r"attack_steps"):
        load_space("atack_steps")


def test_table7_has_the_six_convnext_tiny_designs() -> None:
    space = _bundled("table7_convnext_tiny_stems")
    assert space.flat_keys() == ["model.stem"]
    assert space.search["model.stem"].grid == [f"table7:{i}" for i in range(1, 7)]
    assert space.grid_size() == 6
    base = load_config(space.recipe, values=space.trial_values({"model.stem": "table7:1"}))
    assert base.model.name == "convnext_tiny_cvst" and base.schedule.epochs == 50
    # App. B: clean non-stem weights, random stem; heavy augmentation and 2-step APGD (Table 7 row 1
    # equals Table 1's ConvNeXt-T '+ heavy augmentations').
    assert base.model.init is None and base.model.pretrained == "hub:convnext_tiny.fb_in1k"
    assert base.aug.preset == "heavy" and base.attack.steps == 2
    assert base.attack.eps == pytest.approx(4 / 255)
    # Row 1 is the PatchStem, row 6 the paper's ConvStem (Conv3,2 - Conv3,2).
    assert NAMED_STEMS["table7:1"] == "k4s4cDL"
    assert NAMED_STEMS["table7:6"] == "k3s2c48LG-k3s2cDLG"


def test_table8_and_table9_designs_and_models() -> None:
    t8 = _bundled("table8_convnext_base_stems")
    assert t8.search["model.stem"].grid == ["table8:P1", "table8:C1", "table8:C2"]
    assert t8.trial_config({"model.stem": "table8:C2"}).model.name == "convnext_base_cvst"
    t9 = _bundled("table9_vit_small_stems")
    assert t9.search["model.stem"].grid == ["table9:P1"] + [f"table9:C{i}" for i in range(1, 6)]
    config = t9.trial_config({"model.stem": "table9:C3"})
    assert config.model.name == "vit_small_cvst" and config.data.resolution == 224
    assert config.model.pretrained == "hub:deit_small_patch16_224.fb_in1k"


def test_table17_grid_is_the_papers_nine_combinations() -> None:
    for name, model in (("table17_wd_ls_grid", "convnext_tiny_cvst"),
                        ("table17_vit_small_wd_ls_grid", "vit_small_cvst")):
        space = _bundled(name)
        # The fast mode searches the whole grid; the paper mode runs the table's five points.
        assert space.grid_size() == 9 and space.in_fast_mode().num_trials() == 9
        assert space.num_trials() == 5
        assert space.search["optim.weight_decay"].grid == [0.5, 0.05, 0.005]
        assert space.search["objective.label_smoothing"].grid == [0.0, 0.1, 0.2]
        config = space.trial_config({"optim.weight_decay": 0.005,
                                     "objective.label_smoothing": 0.2})
        assert config.model.name == model
        assert config.optim.weight_decay == 0.005 and config.objective.label_smoothing == 0.2
        # The setting of App. D.3: strong (clean ConvStem) pre-training, heavy aug., 50 epochs.
        assert config.model.init is not None and config.aug.preset == "heavy"
        assert config.schedule.epochs == 50


def test_attack_steps_and_radius_schedules() -> None:
    steps = _bundled("attack_steps")
    assert steps.search["attack.steps"].grid == [1, 2, 3]
    assert steps.trial_config({"attack.steps": 3}).attack.steps == 3
    radius = _bundled("radius_schedules")
    assert radius.search["attack.eps_schedule"].grid == ["fixed", "linear", "epsilon_scheduling"]
    config = radius.trial_config({"attack.eps_schedule": "epsilon_scheduling"})
    assert (config.attack.eps_t1, config.attack.eps_t2) == (12.0, 37.0)
    assert radius.scheduler.kind == "fifo"


def test_quick_cpu_space_is_short_and_its_stems_train_on_32px_atto() -> None:
    space = _bundled("quick_stems_cpu")
    assert space.recipe == "quickstart"
    stems = space.search["model.stem"].grid
    assert len(set(stems)) >= 4 and all(s.startswith("table7:") for s in stems)
    # ASHA's first rung after the quickstart's 1-epoch warm-up.
    assert space.scheduler.kind == "asha" and space.scheduler.grace_period == 2
    assert space.scheduler_max_t() <= 3
    for stem in stems:
        config = space.trial_config({"model.stem": stem})
        assert config.data.train_size <= 1000 and config.data.heldout_size <= 200
        m = config.model
        model = create_robust_model(m.name, num_classes=m.num_classes, stem=m.stem,
                                    small_input=m.small_input)
        side = config.data.resolution
        x = torch.rand(2, 3, side, side, requires_grad=True)
        logits = model(x)
        logits.sum().backward()
        assert logits.shape == (2, 10) and x.grad is not None and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- mistakes fail early
def test_typo_key_names_the_key_the_file_and_the_fix(tmp_path) -> None:
    path = _write(tmp_path, search={"optim.wieght_decay": {"grid": [0.05, 0.5]}})
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert "optim.wieght_decay" in message and str(path) in message
    assert "did you mean optim.weight_decay" in message
    assert "\n" not in message
    with pytest.raises(UserError, match=r"unknown fixed key 'schedule\.epoch'.*schedule\.epochs"):
        load_space(_write(tmp_path, fixed={"schedule.epoch": 3}))


@pytest.mark.parametrize("stem, why", [
    ("table7:9", r"unknown stem design 'table7:9'"),
    ("table9:C1", r"total stride 16 does not fit convnext_atto_cvst"),
    ("k3s2c48LG-k3s2c64LG", r"needs 40"),
    ("k3s2c48LQ", r"not of the form"),
])
def test_bad_stem_value_fails_before_any_trial(tmp_path, stem, why) -> None:
    path = _write(tmp_path, search={"model.stem": {"grid": ["table7:6", stem]}})
    with pytest.raises(UserError, match=why) as info:
        load_space(path)
    assert "model.stem" in str(info.value) and str(path) in str(info.value)


def test_bad_values_and_settings_fail(tmp_path) -> None:
    cases = [
        ({"search": {"attack.steps": {"grid": [1, 0]}}}, r"attack\.steps.*value 0"),
        ({"search": {"attack.eps_schedule": {"choice": ["fixed", "cosine"]}}}, r"cosine"),
        ({"search": {"attack.steps": {"uniform": [1, 3]}}}, r"use grid or choice"),
        ({"search": {"optim.lr": {"loguniform": [0.0, 1.0e-2]}}}, r"lo > 0"),
        ({"search": {"optim.lr": {"grid": [1.0e-3], "choice": [1.0e-3]}}}, r"exactly one"),
        ({"search": {"optim.lr": {"grid": []}}}, r"at least 1"),
        ({"fixed": {"attack.eps_t1": 5}, "search": {"attack.eps_t2": {"grid": [10, 2]}}},
         r"eps_t2 \(2\.0\) must be >= attack\.eps_t1"),
        ({"search": {"attack.eps_t1": {"grid": [0.0, 4.0]}, "attack.eps_t2": {"grid": [2.0, 6.0]}}},
         r"'attack\.eps_t1' value 4\.0 \(with attack\.eps_t2=2\.0\): .*eps_t2 \(2\.0\) must"),
        ({"search": {"attack.eps_t1": {"grid": [0.0, 4.0]}, "attack.eps_t2": {"grid": [6.0, 2.0]}}},
         r"combination \['attack\.eps_t1=4\.0', 'attack\.eps_t2=2\.0'\]"),
        ({"fixed": {"model.stem": "table7:6"}}, r"'model\.stem' is both fixed and searched"),
        ({"fixed": {"recipe": "table1_convnext_tiny_cvst_random_basic"}}, r"top-level 'recipe:'"),
        ({"recipe": "quickstrat"}, r"unknown recipe 'quickstrat'"),
        ({"scheduler": {"kind": "fifo", "grace_period": 2}}, r"only apply to kind asha"),
        ({"scheduler": {"kind": "hyperband"}}, r"scheduler\.kind"),
        ({"scheduler": {"kind": "asha", "grace_period": 3}}, r"grace_period 3 must be below"),
        ({"num_samples": 0}, r"num_samples"),
        ({"serach": {}}, r"unknown field 'serach'"),
    ]
    for fields, why in cases:
        with pytest.raises(UserError, match=why):
            load_space(_write(tmp_path, **fields))


def test_bad_metric_or_mode_fails(tmp_path) -> None:
    with pytest.raises(UserError, match=r"metric 'heldout_robust_acc' is not reported.*did you "
                                        r"mean heldout_robust_accuracy"):
        load_space(_write(tmp_path, metric="heldout_robust_acc"))
    with pytest.raises(UserError, match=r"mode 'min' would rank the worst trials first"):
        load_space(_write(tmp_path, mode="min"))
    space = load_space(_write(tmp_path, metric="train_loss", mode="min"))
    assert space.metric == "train_loss"


def test_metric_names_are_what_the_training_loop_reports() -> None:
    # The loop reports plain dict keys; a rename there must fail here, not in a Tune run.
    source = (ROOT / "raytrain_at" / "training" / "loop.py").read_text()
    for name in METRIC_MODES:
        assert re.search(rf'["\']{name}["\']\s*:', source), name


# --------------------------------------------------------------------------- Ray Tune and overrides
def test_param_space_uses_ray_tune_domains(tmp_path) -> None:
    from ray.tune.search.sample import Categorical, Float, LogUniform, Uniform

    space = load_space(_write(tmp_path, search={
        "model.stem": {"grid": ["table7:1", "table7:6"]},
        "objective.label_smoothing": {"choice": [0.0, 0.1]},
        "optim.weight_decay": {"uniform": [0.0, 0.1]},
        "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}))
    params = space.to_tune_param_space()  # nested like the run config
    assert list(params) == ["model", "objective", "optim"]
    assert params["model"] == {"stem": {"grid_search": ["table7:1", "table7:6"]}}
    assert isinstance(params["objective"]["label_smoothing"], Categorical)
    assert params["objective"]["label_smoothing"].categories == [0.0, 0.1]
    for key, sampler, (lo, hi) in (("weight_decay", Uniform, (0.0, 0.1)),
                                   ("lr", LogUniform, (1e-4, 1e-2))):
        domain = params["optim"][key]
        assert isinstance(domain, Float) and isinstance(domain.get_sampler(), sampler)
        assert (domain.lower, domain.upper) == (lo, hi)
    assert space.grid_size() == 2 and "schedule" not in params

    table17 = _bundled("table17_wd_ls_grid")
    assert table17.in_fast_mode().to_tune_param_space() == {
        "optim": {"weight_decay": {"grid_search": [0.5, 0.05, 0.005]}},
        "objective": {"label_smoothing": {"grid_search": [0.0, 0.1, 0.2]}}}
    # Paper mode: one grid over the table's rows (Tune has no grid over combinations).
    rows = table17.to_tune_param_space()["paper_row"]["grid_search"]
    assert rows == [row.label for row in table17.paper.rows] and len(rows) == 5


def _recipe_merged_with(space: SearchSpace, sample: dict) -> RunConfig:
    """What a trial must run: the recipe's YAML (base chain merged), its fixed keys and the
    sample, merged as nested dicts and validated; written out here, independent of the space."""
    recipe, path = RECIPES.read(space.recipe)
    data = deep_merge(deep_merge({"recipe": path.stem, **recipe}, nest(space.fixed)), sample)
    return RunConfig.model_validate(data)


def test_trial_config_is_the_recipe_merged_with_its_sample() -> None:
    from ray.tune.search.variant_generator import generate_variants

    for name in ("table7_convnext_tiny_stems", "table17_wd_ls_grid"):
        space = _bundled(name).in_fast_mode()
        # The samples Ray Tune itself resolves from the space: nested dicts, one per grid point.
        samples = [resolved["config"] for _, resolved in
                   generate_variants({"config": space.to_tune_param_space()})]
        assert len(samples) == space.grid_size()
        for sample in samples:
            assert isinstance(next(iter(sample.values())), dict)  # {"model": {"stem": ...}}
            config = space.trial_config(sample)
            assert config == _recipe_merged_with(space, sample)
            assert flatten(config)["recipe"] == space.recipe
        # Paper mode: Tune hands a row's label; the trial runs that row's point.
        paper = _bundled(name)
        samples = [resolved["config"] for _, resolved in
                   generate_variants({"config": paper.to_tune_param_space()})]
        assert len(samples) == len(paper.paper.rows) == paper.num_trials()
        for sample, row in zip(samples, paper.paper.rows):
            assert sample == {"paper_row": row.label}
            assert paper.trial_config(sample) == _recipe_merged_with(paper, nest(row.point))
            assert paper.paper_row(paper.flat_sample(sample)) is row
    space = _bundled("table7_convnext_tiny_stems")
    config = space.trial_config({"model.stem": "table7:4"})  # the dotted spelling: the same
    assert config == _recipe_merged_with(space, {"model": {"stem": "table7:4"}})
    assert config.model.stem == "table7:4" and config.model.init is None
    assert config.model.pretrained == "hub:convnext_tiny.fb_in1k"
    assert config.schedule.epochs == 50
    with pytest.raises(UserError,
                       match=r"missing \['model\.stem'\].*unexpected \['model\.stme'\]"):
        space.trial_config({"model": {"stme": "table7:4"}})


def test_sampled_values_keep_their_type() -> None:
    # No text round trip: a string that YAML would read as null, a bool or a float stays a string.
    for text in ("null", "yes", "1e-3", "", "a=b"):
        config = load_config("quickstart", values={"tracking.run_name": text})
        assert config.tracking.run_name == text
    assert load_config("quickstart", values={"optim": {"betas": [0.8, 0.9]}}).optim.betas == \
        (0.8, 0.9)


def test_values_are_canonicalised_by_the_config(tmp_path) -> None:
    # PyYAML reads 5e-3 as a string; the space stores the float the config parses it to.
    path = tmp_path / "space.yaml"
    path.write_text("description: d\nrecipe: quickstart\n"
                    "search:\n  optim.weight_decay: {grid: [5e-3, 0.05]}\n  attack.eps: "
                    "{choice: [2/255, 8/255]}\n")
    space = load_space(path)
    assert space.search["optim.weight_decay"].grid == [0.005, 0.05]
    assert space.search["attack.eps"].choice == [pytest.approx(2 / 255), pytest.approx(8 / 255)]
    assert space.scheduler.kind == "fifo" and space.num_samples == 1
    with pytest.raises(UserError, match=r"repeat once parsed"):
        path.write_text("description: d\nrecipe: quickstart\n"
                        "search:\n  optim.weight_decay: {grid: [5e-3, 0.005]}\n")
        load_space(path)


def test_direct_construction_checks_shape_and_validate_against_config_the_rest() -> None:
    # Direct construction checks the YAML's shape; load_space adds the checks against the recipe.
    space = SearchSpace(description="d", recipe="quickstart",
                        search={"optim.wieght_decay": {"grid": [0.1]}})
    with pytest.raises(UserError, match=r"did you mean optim\.weight_decay"):
        space.validate_against_config()


# --------------------------------------------------------------------------- paper and fast modes
# Table 7 as printed (App. B.1): FLOPs, clean, l_inf, l_2, l_1 per design.
TABLE7 = {"table7:1": (4.49, 71.0, 46.5, 38.1, 14.9), "table7:2": (4.50, 69.8, 46.6, 38.4, 17.6),
          "table7:3": (4.63, 67.5, 43.6, 37.9, 15.7), "table7:4": (4.66, 69.6, 47.6, 38.8, 18.7),
          "table7:5": (4.62, 70.2, 47.4, 44.2, 21.2), "table7:6": (4.59, 69.5, 46.2, 47.8, 27.7)}
PAPER_SPACES = ("table7_convnext_tiny_stems", "table8_convnext_base_stems",
                "table9_vit_small_stems", "table17_wd_ls_grid", "table17_vit_small_wd_ls_grid",
                "attack_steps")


@pytest.mark.parametrize("name", PAPER_SPACES)
def test_table_spaces_reproduce_their_table_in_paper_mode(name) -> None:
    """Paper mode: the table's rows, each its full schedule (FIFO), every one evaluated with
    standard AutoAttack in the three norms on all RobustBench images; --fast: ASHA whose first
    rung comes after the warm-up."""
    space = _bundled(name)
    assert space.study_mode == "paper" and space.scheduler.kind == "fifo"
    assert space.num_trials() == len(space.paper.rows)
    spec = space.evaluation
    assert spec.top == "all" and spec.version == "standard" and spec.n is None
    assert spec.norms == ["linf", "l2", "l1"] and not spec.eps  # the paper's radii
    assert spec.data.endswith("imagenet_robustbench5k.beton")
    assert space.trial_points() == [row.point for row in space.paper.rows]
    for row in space.paper.rows:
        assert space.trial_config(row.point).schedule.epochs == 50  # the table's full schedule
    fast = space.in_fast_mode()
    assert fast.study_mode == "fast" and fast.scheduler.kind == "asha"
    assert fast.num_trials() == space.grid_size() and fast.evaluation.top == 1
    warmup = space.trial_config(space.paper.rows[0].point).optim.warmup_epochs
    assert fast.scheduler.grace_period > warmup


def test_table7_rows_are_the_papers_numbers() -> None:
    space = _bundled("table7_convnext_tiny_stems")
    assert [row.point["model.stem"] for row in space.paper.rows] == list(TABLE7)
    for row in space.paper.rows:
        assert (row.flops, row.clean, row.linf, row.l2, row.l1) == TABLE7[row.point["model.stem"]]
    assert space.paper_row({"model.stem": "table7:6"}).published() == pytest.approx(
        {"clean_acc": 0.695, "robust_acc_linf": 0.462, "robust_acc_l2": 0.478,
         "robust_acc_l1": 0.277})
    # Every design the grid has is a row of the table (Tables 8 and 9 too).
    for name in ("table7_convnext_tiny_stems", "table8_convnext_base_stems",
                 "table9_vit_small_stems"):
        designs = _bundled(name)
        assert [row.point["model.stem"] for row in designs.paper.rows] == \
            designs.search["model.stem"].grid
    t9 = {row.point["model.stem"]: row for row in _bundled("table9_vit_small_stems").paper.rows}
    assert (t9["table9:C5"].l1, t9["table9:C1"].linf, t9["table9:P1"].flops) == (33.2, 43.3, 4.61)
    t17 = _bundled("table17_wd_ls_grid").paper.rows
    assert [(r.point["optim.weight_decay"], r.point["objective.label_smoothing"], r.linf)
            for r in t17] == [(0.5, 0.1, 27.5), (0.05, 0.1, 47.5), (0.005, 0.1, 47.2),
                              (0.05, 0.0, 47.4), (0.05, 0.2, 47.3)]


def _paper(rows=None, **fields) -> dict:
    data = {"scheduler": {"kind": "fifo"},
            "evaluation": {"top": "all", "n": 4, "version": "fast"},
            "fast": {"scheduler": {"kind": "asha", "grace_period": 2}},
            "paper": {"table": "Table T", "rows": rows or [
                {"label": "one", "point": {"model.stem": "table7:1"}, "linf": 40.0},
                {"label": "six", "point": {"model.stem": "table7:6"}, "linf": 45.0}]}}
    data.update(fields)
    return data


def test_paper_mode_mistakes_fail_before_any_trial(tmp_path) -> None:
    space = load_space(_write(tmp_path, **_paper()))
    assert space.study_mode == "paper" and space.num_trials() == 2
    assert space.to_tune_param_space() == {"paper_row": {"grid_search": ["one", "six"]}}
    assert space.in_fast_mode().scheduler.grace_period == 2
    cases = [
        (_paper(rows=[{"label": "x", "point": {"model.stem": "table7:3"}}]),
         r"paper row 'x': model\.stem='table7:3' is not in its grid"),
        (_paper(rows=[{"label": "x", "point": {"optim.lr": 0.1}}]),
         r"paper row 'x' sets \['optim\.lr'\], the searched keys are \['model\.stem'\]"),
        (_paper(rows=[{"label": "x", "point": {"model.stem": "table7:1"}},
                      {"label": "x", "point": {"model.stem": "table7:6"}}]), r"repeat a label"),
        (_paper(scheduler={"kind": "asha", "grace_period": 2}), r"scheduler must be fifo"),
        (_paper(evaluation={"top": 1}), r"set evaluation\.top to all"),
        (_paper(evaluation={"top": "all", "norms": ["linf", "l2"]}), r"lacks l1"),
        (_paper(fast={"scheduler": {"kind": "fifo"}}), r"fast\.scheduler\.kind must be asha"),
        (_paper(fast={"scheduler": {"kind": "asha", "grace_period": 1}}),
         r"fast\.scheduler\.grace_period 1 ends within the 1 warm-up epochs"),
        (_paper(search={"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}), r"grid keys only"),
    ]
    for fields, why in cases:
        with pytest.raises(UserError, match=why):
            load_space(_write(tmp_path, **fields))
    with pytest.raises(UserError, match=r"has no fast mode"):
        load_space(_write(tmp_path)).in_fast_mode()


def test_asha_must_not_judge_trials_on_their_warm_up(tmp_path) -> None:
    # The quickstart warms up for 1 epoch: a 1-epoch grace period ranks trials on the warm-up.
    with pytest.raises(UserError, match=r"scheduler\.grace_period 1 ends within the 1 warm-up "
                                        r"epochs.*above 1"):
        load_space(_write(tmp_path, scheduler={"kind": "asha", "grace_period": 1}))
    assert load_space(_write(tmp_path, fixed={"schedule.epochs": 3, "optim.warmup_epochs": 0},
                             scheduler={"kind": "asha", "grace_period": 1})).num_trials() == 2
