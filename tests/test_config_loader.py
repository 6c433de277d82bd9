"""The one YAML loader (raytrain_at/config_loader.py): it reads every recipe, search space and
benchmark spec the project ships, with one base: chain, one override syntax, one radius parser
and one-line errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from import_graph import attribute_uses

from raytrain_at.config import load_config
from raytrain_at.config_loader import (
    FINETUNE_BENCHMARKS,
    RECIPES,
    SPACES,
    StrictModel,
    deep_merge,
    flat_keys,
    nest,
    overrides_to_dict,
    parse_radius,
)
from raytrain_at.errors import UserError
from raytrain_at.finetune_benchmark.spec import load_benchmark
from raytrain_at.tuning.spaces import load_space

PACKAGE = Path(__file__).resolve().parents[1] / "raytrain_at"
KINDS = (RECIPES, SPACES, FINETUNE_BENCHMARKS)  # every kind of YAML file the project ships


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.folder)
def test_every_shipped_yaml_is_read_by_the_loader(kind) -> None:
    files = sorted(kind.bundled_dir().glob("*.yaml"))
    assert files
    for path in files:
        data, source = kind.read(path.stem)
        assert source == path and isinstance(data, dict) and "base" not in data


def test_no_other_module_parses_yaml() -> None:
    # One loader: every other module goes through config_loader (writing YAML is fine).
    readers = [f"{use.path}:{use.line}" for use in attribute_uses(PACKAGE)
               if use.path != "config_loader.py"
               and use.dotted in ("yaml.safe_load", "yaml.load", "yaml.full_load")]
    assert not readers


def test_base_chain_merges_key_by_key_for_every_kind(tmp_path, monkeypatch) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("description: d\nrecipe: quickstart\nfixed: {schedule.epochs: 3, seed: 1}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\nfixed: {{seed: 2}}\nmetric: train_loss\n")
    data, _ = SPACES.read(child)
    assert data == {"description": "d", "recipe": "quickstart", "metric": "train_loss",
                    "fixed": {"schedule.epochs": 3, "seed": 2}}
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    for kind in KINDS:
        with pytest.raises(UserError, match=rf"{kind.noun} '.*loop.yaml' inherits from itself"):
            kind.read(loop)
    # A bundled recipe's base is a bundled name: table12 inherits Table 1's heavy row.
    data, _ = RECIPES.read("table12_convnext_tiny_50ep_pgd2")
    parent, _ = RECIPES.read("table1_convnext_tiny_pretrained_heavy")
    assert data["model"] == deep_merge(parent["model"], data["model"])


def test_dotted_keys_are_one_syntax() -> None:
    assert nest({"optim.lr": 1e-3, "optim": {"betas": [0.9, 0.99]}, "seed": 3}) == \
        {"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "seed": 3}
    assert flat_keys({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}}) == \
        {"optim.lr": 1e-3, "optim.betas": [0.9, 0.99]}
    assert overrides_to_dict(["optim.lr=5.0e-4", "model.stem=table7:4", "optim.lr=1.0e-3"]) == \
        {"optim": {"lr": 1e-3}, "model": {"stem": "table7:4"}}
    text = load_config("quickstart", ["optim.lr=5.0e-4", "attack.eps=8/255"])
    values = load_config("quickstart", values={"optim": {"lr": 5e-4}, "attack.eps": "8/255"})
    assert text == values and values.attack.eps == pytest.approx(8 / 255)
    for bad in ("optim..lr=1", "=1"):
        with pytest.raises(UserError, match="empty key"):
            overrides_to_dict([bad])
    with pytest.raises(UserError, match="empty key"):
        nest({"optim.": 1})


def test_one_radius_parser() -> None:
    assert parse_radius("4/255") == pytest.approx(4 / 255)
    assert parse_radius(" 8/255 ") == pytest.approx(8 / 255)
    assert parse_radius(0.5) == 0.5 and parse_radius("1/0") == "1/0"  # left to the field
    with pytest.raises(UserError, match=r"config key 'attack\.eps'.*got '1/0'"):
        load_config("quickstart", ["attack.eps=1/0"])


def test_errors_are_one_line_naming_file_and_key(tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("description: d\nrecipe: quickstart\nsearch: {seed: {grid: [1, 2]}}\n"
                     "scheduler: {kind: fifo, grace_perod: 2}\n")
    with pytest.raises(UserError) as info:
        load_space(space)
    assert str(info.value) == (f"search space {str(space)!r}: unknown field "
                               "'scheduler.grace_perod'")
    spec = tmp_path / "bench.yaml"
    data = yaml.safe_load(
        (FINETUNE_BENCHMARKS.bundled_dir() / "robust_finetune.yaml").read_text())
    data["num_samples"] = 0
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        load_benchmark(spec)
    message = str(info.value)
    assert message.startswith(f"fine-tuning benchmark {str(spec)!r}: field 'num_samples'")
    assert "(got 0)" in message
    assert "\n" not in message
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    for kind in KINDS:
        with pytest.raises(UserError, match=rf"^{kind.noun} '.*bad.yaml' must be a mapping"):
            kind.read(bad)
    with pytest.raises(UserError, match=r"^unknown config key 'optim\.lrr'$"):
        load_config("quickstart", ["optim.lrr=1"])


@pytest.mark.parametrize("override, key, shown", [
    ("optim.lr=inf", "optim.lr", "'inf'"),
    ("optim.lr=.inf", "optim.lr", "inf"),  # YAML's infinity
    ("attack.eps=.inf", "attack.eps", "inf"),
    ("attack.eps=nan", "attack.eps", "'nan'"),
    ("optim.grad_clip=-inf", "optim.grad_clip", "'-inf'"),
    ("optim.betas=[0.9, .nan]", "optim.betas.1", "nan"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key, shown) -> None:
    with pytest.raises(UserError) as info:
        load_config("quickstart", [override])
    assert str(info.value) == (f"config key {key!r}: Input should be a finite number "
                               f"(got {shown})")
    assert load_config("quickstart", ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_every_config_section_refuses_non_finite_floats() -> None:
    """One rule for all sections (run config, search spaces, benchmark specs): no subclass of
    StrictModel turns the finite-float check back off."""
    seen, todo = [], [StrictModel]
    while todo:
        model = todo.pop()
        seen.append(model)
        todo.extend(model.__subclasses__())
    assert len(seen) > 20
    assert [m.__name__ for m in seen if m.model_config.get("allow_inf_nan") is not False] == []
