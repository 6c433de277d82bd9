"""What the registry's pages say, without a store: 95 % Wilson intervals, the paper's rows per
recipe, a version's report card, a registered model's card and the leaderboard's Markdown / HTML.
"""

from __future__ import annotations

import json
import re

import pytest

from raytrain_at.config import available_recipes, load_config
from raytrain_at.evaluation.intervals import wilson_interval
from raytrain_at.evaluation.result import EvaluationResult
from raytrain_at.recipe_table import recipe_purpose
from raytrain_at.registry import paper_rows as paper
from raytrain_at.registry.leaderboard_formats import render
from raytrain_at.registry.register import draft_card, recipe_changes
from raytrain_at.registry.report_card import (MAX_DESCRIPTION, Lineage, RunRef, VersionCard,
                                              model_card, version_card, with_reevaluation)
from raytrain_at.training.loop import training_metadata


# ------------------------------------------------------------------------------- intervals
@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 8, 0.676, 1.000), (0, 8, 0.000, 0.324), (4, 8, 0.215, 0.785), (7, 8, 0.529, 0.978),
    (15, 16, 0.717, 0.989), (2473, 5000, 0.4808, 0.5085)])
def test_wilson_interval_known_values(k, n, low, high):
    digits = 4 if n == 5000 else 3
    got = wilson_interval(k, n)
    assert (round(got[0], digits), round(got[1], digits)) == (low, high)


def test_wilson_interval_equals_scipy_reference():
    from scipy.stats import binomtest

    for n in (1, 2, 8, 16, 32, 150, 297, 5000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)


def test_wilson_interval_rejects_impossible_counts():
    for k, n in ((9, 8), (-1, 8), (0, 0)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(k, n)


def _result(n: int = 8, robust: dict[str, int] | None = None, clean: int | None = None,
            trustworthy: bool = True, **extra) -> dict:
    """A result JSON as ``evaluate`` writes it (without the intervals, as older files are)."""
    clean = n if clean is None else clean
    robust = robust or {"linf": 7, "l2": 6, "l1": 5}
    eps = {"linf": 8 / 255, "l2": 1.0, "l1": 8.0}
    threats = {}
    for norm, count in robust.items():
        status = ["robust"] * count + ["apgd-ce"] * (clean - count) + \
            ["misclassified"] * (n - clean)
        threats[norm] = {"norm": norm, "eps": eps[norm], "clean_accuracy": clean / n,
                         "robust_accuracy": count / n, "after_attack": {"apgd-ce": count / n},
                         "broken_by": {"apgd-ce": clean - count}, "max_perturbation": eps[norm],
                         "status": status}
    return {"format": "raytrain_at.evaluation/1",
            "model": {"reference": "runs:/abc/model", "weights_sha256": "ab" * 32,
                      "name": "convnext_atto_cvst", "num_classes": 10, "trained_resolution": 32},
            "data": {"path": "/home/x/.raytrain_at/digits_test.beton", "n": n,
                     "resolution": 32, "crop_pct": 1.0},
            "version": "standard", "seed": 0, "batch_size": n, "workers": 2,
            "clean_accuracy": clean / n, "threats": threats,
            "guards": [{"name": "randomized", "passed": True, "detail": "no warning"},
                       {"name": "robust_le_clean.linf", "passed": trustworthy, "detail": "-"}],
            "trustworthy": trustworthy, "wall_seconds": 151.0, "code_version": "0.1.0",
            "created": "2026-12-06T20:00:00+00:00", **extra}


def test_result_json_carries_intervals_and_older_files_get_them():
    result = EvaluationResult.model_validate(_result(n=8, robust={"linf": 8, "l2": 4, "l1": 0}))
    assert result.clean_interval == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert result.threats["linf"].robust_interval == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert result.threats["l2"].robust_interval == pytest.approx((0.2152, 0.7848), abs=1e-4)
    assert result.threats["l1"].robust_interval[0] == 0.0
    written = json.loads(result.model_dump_json())
    assert written["threats"]["l2"]["robust_interval"] == pytest.approx([0.2152, 0.7848],
                                                                        abs=1e-4)
    assert written["clean_interval"] == pytest.approx([0.6756, 1.0], abs=1e-4)
    again = EvaluationResult.model_validate(written)  # strict model: the fields read back
    assert again.threats["l2"].robust_interval == result.threats["l2"].robust_interval


def test_sweep_points_get_intervals_over_the_same_images():
    data = _result(n=16, eps_sweep={
        "norm": "linf", "version": "apgdt", "clean_accuracy": 1.0, "expected_robustness": 0.5,
        "points": [{"eps": 2 / 255, "robust_accuracy": 0.75}, {"eps": 4 / 255,
                                                               "robust_accuracy": 0.5}]})
    sweep = EvaluationResult.model_validate(data).eps_sweep
    assert sweep is not None
    assert sweep.points[0].robust_interval == pytest.approx(wilson_interval(12, 16))
    assert sweep.clean_interval == pytest.approx(wilson_interval(16, 16))


def test_console_summary_shows_the_intervals():
    from rich.console import Console

    from raytrain_at.evaluation.result import summary_table

    console = Console(width=200, record=True)
    console.print(summary_table(EvaluationResult.model_validate(_result())))
    text = console.export_text()
    assert "87.5% [52.9, 97.8]" in text and "100.0% [67.6, 100.0]" in text
    assert "[low, high]: 95 % Wilson interval over n=8" in " ".join(text.split())


# ------------------------------------------------------------------------------- paper rows
def test_every_table_recipe_has_its_printed_row():
    tables = [r for r in available_recipes() if re.match(r"table(1|2|11|12)_", r)]
    assert len(tables) == 18 + 18 + 2 + 1
    for recipe in tables:
        rows = paper.paper_rows(recipe)
        assert rows, recipe
        # The recipe's own first line names the table, architecture and stem of its first row.
        purpose, row = recipe_purpose(recipe), rows[0]
        assert purpose.startswith(row.table), (recipe, purpose)
        family = next(f for f in ("ViT", "Iso", "ConvNeXt") if row.row.startswith(f))
        assert family in purpose, (recipe, purpose, row)
        assert ("+ C" in row.row) == ("+ C" in purpose), (recipe, purpose, row)
        if row.table.startswith("Table 2"):
            assert row.row.split(", ", 1)[1] in purpose, (recipe, purpose, row)
    # Table 1 has 6 architectures x 4 schemes; Table 2 18 rows of "ours".
    assert len(paper.TABLE1) == 24 and len(paper.TABLE2) == 18
    assert paper.paper_rows("quickstart") == [] and paper.paper_rows(None) == []
    assert [r.table for r in paper.paper_rows("table2_convnext_tiny_cvst_300ep_2step")] == [
        "Table 2 (small)", "Table 1"]
    row = paper.paper_rows("table2_convnext_tiny_cvst_300ep_2step")[0]
    assert (row.clean, row.linf, row.l2, row.l1) == (72.72, 49.46, 48.42, 24.52)


# Where the paper's Table 1 "50 -> 300 epochs" row is not Table 2's row rounded to one decimal
# (the paper prints these inconsistently): (Table 1 key, accuracy).
TABLE1_VS_TABLE2_PRINTED = {("convnext_iso_small_cvst_300ep", "clean"),
                            ("convnext_iso_small_cvst_300ep", "l1"),
                            ("vit_small_cvst_300ep", "clean")}


def test_table1_long_rows_agree_with_table2_as_printed():
    """A typo in either table's transcription shows up as a disagreement beyond rounding."""
    compared = 0
    for recipe, row in paper.TABLE2.items():
        if not recipe.endswith("_300ep_2step"):
            continue
        key = recipe.removeprefix("table2_").removesuffix("_2step")
        short = paper.TABLE1[key]
        for name in ("clean", "linf", "l2", "l1"):
            agree = abs(round(row.accuracy(name), 1) - short.accuracy(name)) < 0.051
            assert agree != ((key, name) in TABLE1_VS_TABLE2_PRINTED), (key, name)
            compared += 1
    assert compared == 6 * 4


def test_size_reference_is_table2s_most_robust_of_the_class():
    small = paper.size_reference(3.4)
    assert small is not None and small.linf == 50.16 and "3 steps" in small.row
    large = paper.size_reference(88.0)
    assert large is not None and large.linf == 56.28
    assert paper.reference_rows("quickstart", 3.4) == ([small], False)
    assert paper.reference_rows("table2_vit_medium_50ep_2step", 3.4)[1] is True


# ------------------------------------------------------------------------------- version card
def _card(result: dict | None, recipe: str | None = "table2_convnext_tiny_cvst_300ep_2step",
          **params) -> VersionCard:
    params = {"architecture": "convnext_tiny_cvst", "stem": "default", "params_m": "28.63",
              "flops_g": "4.600", "trained_resolution": 224, "recipe": recipe, "epochs": 300,
              "attack_steps": 2, "selected_epoch": "297", "train_objective": "adversarial",
              "train_norm": "linf", "train_eps": 4 / 255, **params}
    lineage = Lineage(init="run:clean-pretraining/clean_convnext_tiny_cvst",
                      init_run=RunRef("c1e4", "3", "clean_convnext_tiny_cvst"),
                      init_is_clean=True, training=RunRef("a7d9", "4", "table2-run"),
                      selected_epoch="297", epochs="300",
                      selected_by="best held-out robust accuracy (APGD-CE, 1 step)")
    return VersionCard(name="robust-net", version="3", model_id="m-123", experiment_id="4",
                       params=params, lineage=lineage,
                       result=None if result is None else EvaluationResult.model_validate(result),
                       files={"result": "evaluation.json", "guards": "guards.json",
                              "eps sweep": "evaluation_eps.png"})


def test_version_card_shows_accuracies_intervals_paper_row_and_lineage():
    text = version_card(_card(_result()))
    first = text.splitlines()[0]
    assert first == ("clean 100.0 %, l_inf 87.5 %, l_2 75.0 %, l_1 62.5 % on n=8 "
                     "(AutoAttack standard, guards passed)")
    for shown in ("| clean | 100.0 % (8/8) | [67.6, 100.0] | - | 72.72 | 72.70 |",
                  "| l_inf | 87.5 % (7/8) | [52.9, 97.8] | 8/255 | 49.46 | 49.50 |",
                  "| l_2 | 75.0 % (6/8) | [40.9, 92.9] | 1 | 48.42 | 48.40 |",
                  "| l_1 | 62.5 % (5/8) | [30.6, 86.3] | 8 | 24.52 | 24.50 |",
                  "**n = 8**", "`digits_test.beton` at 32 px", "all 2 guards passed",
                  "APGD-CE, APGD-T, FAB-T, Square",
                  "Table 2 (small), ConvNeXt-T + ConvStem, ours, 300 epochs, 2 steps",
                  "**not comparable** with ours", "n=8 (paper 5000)",
                  "clean pre-training: [run clean_convnext_tiny_cvst](#/experiments/3/runs/c1e4)",
                  "adversarial training: [run table2-run](#/experiments/4/runs/a7d9)",
                  "selected epoch **297** of 300 (best held-out robust accuracy",
                  "[evaluation.json](model-versions/get-artifact?name=robust-net&version=3&"
                  "path=evaluation.json)",
                  "![eps sweep](model-versions/get-artifact?name=robust-net&version=3&"
                  "path=evaluation_eps.png)",
                  "[logged model](#/experiments/4/models/m-123)",
                  "trained 300 epochs (adversarial) against 2-step l_inf attacks at 4/255"):
        assert shown in text, shown
    assert len(text) <= MAX_DESCRIPTION


def test_version_card_of_a_failed_or_missing_evaluation():
    failed = _card(_result(trustworthy=False))
    failed.forced = True
    text = version_card(failed)
    assert "UNTRUSTWORTHY" in text.splitlines()[0]
    assert "**UNTRUSTWORTHY**: failed robust_le_clean.linf (registered with --force" in text
    unevaluated = version_card(_card(None, recipe="quickstart", params_m="3.37"))
    assert unevaluated.startswith("Not evaluated") and "| l_inf |" not in unevaluated
    assert "`quickstart` (no row of the paper)" in unevaluated


def test_version_card_without_a_paper_row_shows_its_size_reference():
    text = version_card(_card(_result(), recipe="quickstart", params_m="3.37"))
    assert "**Paper row**: none (recipe `quickstart` is no row of the paper)" in text
    assert "Table 2 (small), ConvNeXt-T + ConvStem, ours, 300 epochs, 3 steps" in text
    assert "| l_inf | 87.5 % (7/8) | [52.9, 97.8] | 8/255 | 50.16 |" in text


def test_version_card_fits_the_description_column():
    card = _card(_result(), recipe_changes=None)
    card.recipe_changes = [f"optim.key_{i}={'x' * 300}" for i in range(40)]
    card.files = {f"plot {i}": f"{'p' * 200}_{i}.png" for i in range(20)}
    text = version_card(card)
    assert len(text) <= MAX_DESCRIPTION
    assert "| l_1 | 62.5 % (5/8)" in text  # the accuracies are kept, the plots dropped


def test_reevaluation_note_goes_after_the_summary_and_replaces_an_older_one():
    text = version_card(_card(_result()))
    once = with_reevaluation(text, "robust-net", "4", "clean 90.0 % on n=5000", "2026-12-07")
    twice = with_reevaluation(once, "robust-net", "5", "clean 91.0 % on n=5000", "2026-12-08")
    lines = twice.splitlines()
    assert lines[0] == text.splitlines()[0]
    assert lines[2].startswith("**Re-evaluated** 2026-12-08") and "[v5](#/models/robust-net/"\
        "versions/5)" in lines[2]
    assert "v4" not in twice.split("\n", 3)[2] and twice.count("**Re-evaluated**") == 1


def test_recipe_changes_name_the_keys_a_run_changed():
    config = load_config("table2_convnext_tiny_cvst_300ep_2step",
                         ["model.name=test_resnet", "schedule.epochs=2",
                          "scaling.num_workers=1", "tracking.experiment=elsewhere"])
    metadata = training_metadata(config, epoch=2, selected_by="best held-out robust accuracy")
    assert recipe_changes(json.loads(metadata["raytrain_at.run_config"])) == [
        "model.name=test_resnet", "schedule.epochs=2"]
    unchanged = training_metadata(load_config("quickstart"), epoch=6)
    card = draft_card({"epochs": 6, "selected_epoch": "5"}, unchanged, None, {})
    assert card.recipe_changes == [] and card.lineage.init is None
    assert card.lineage.recorded and card.lineage.selected_epoch == "5"
    assert recipe_changes(None) is None and recipe_changes({"recipe": "my-own.yaml"}) is None


# ------------------------------------------------------------------------------- model card
def _row(version: int, linf: float, aliases: list[str], trustworthy: str = "true") -> dict:
    return {"name": "robust-net", "version": version, "aliases": aliases,
            "metrics": {"clean_acc": 1.0, "robust_acc_linf": linf, "robust_acc_l2": 0.75,
                        "robust_acc_l1": 0.5},
            "params": {"architecture": "convnext_atto_cvst", "params_m": "3.37",
                       "eval_data": "/x/digits_test.beton", "eval_n": "8",
                       "eval_resolution": "32", "eps_linf": "0.0313725", "eps_l2": "1",
                       "eps_l1": "8", "recipe": "quickstart"},
            "tags": {"trustworthy": trustworthy}}


def test_model_card_names_champions_and_lists_versions_newest_first():
    from raytrain_at.registry.report_card import HistoryLink

    rows = [_row(1, 0.5, []), _row(2, 0.875, ["champion-linf", "champion-l2", "champion-l1"]),
            _row(3, 0.25, [], trustworthy="false")]
    history = HistoryLink([f"2026-12-0{i} champion-linf moved to v{i}" for i in (1, 2)],
                          artifact_url="get-artifact?path=alias_history.txt&run_uuid=r1")
    text = model_card("robust-net", rows, "raytrain-at-leaderboard", history)
    assert ("| l_inf | [v2](#/models/robust-net/versions/2) | 87.5 [52.9, 97.8] | "
            "100.0 [67.6, 100.0] | 8/255 | digits_test.beton | 8 | 32 |") in text
    versions = [line for line in text.splitlines() if line.startswith("| [v")]
    assert [line.split("]")[0] for line in versions] == ["| [v3", "| [v2", "| [v1"]
    assert "**failed**" in versions[0] and "passed" in versions[1]
    assert text.index("moved to v2") < text.index("moved to v1")  # newest first
    assert "[all 2](get-artifact?path=alias_history.txt&run_uuid=r1)" in text
    assert "[raytrain-at-leaderboard](#/models/raytrain-at-leaderboard)" in text
    many = model_card("robust-net", [_row(v, 0.5, []) for v in range(1, 80)], None, None)
    assert len(many) <= MAX_DESCRIPTION and "older versions" in many
    assert "[v79]" in many and "[v1]" not in many


# ------------------------------------------------------------------------------- leaderboard
def test_leaderboard_markdown_and_html_follow_table2_with_intervals():
    rows = [_row(1, 0.5, []), _row(2, 0.875, ["champion-linf"])]
    rows[0]["params"]["params_m"] = "88.6"  # a large model: listed after the small ones
    md = render(rows, "markdown", "t").splitlines()
    assert md[0].startswith("| size | model |") and "| l_inf [95 % CI] | eps l_inf |" in md[0]
    assert md[2].startswith("| small | robust-net v2 |") and md[3].startswith("| large |")
    assert "| 87.5 [52.9, 97.8] | 8/255 |" in md[2]
    page = render(rows, "html", "Leaderboard <all>")
    assert page.startswith("<!doctype html>") and "<title>Leaderboard &lt;all&gt;</title>" in page
    assert page.count("<tr>") == 3 and "<td class=num>87.5 [52.9, 97.8]</td>" in page
    [record, _] = json.loads(render(rows, "json", "t"))
    assert record["robust_acc_linf_ci95_low"] == pytest.approx(0.2152, abs=1e-4)
    assert record["size"] == "large"


def test_leaderboard_card_fits_the_description_column():
    from raytrain_at.registry.report_card import leaderboard_card

    rows = [_row(v, 0.875 - v / 1000, ["champion-linf"] if v == 1 else []) for v in range(1, 60)]
    text = leaderboard_card(rows, "Leaderboard")
    assert len(text) <= MAX_DESCRIPTION and "more: `raytrain-at leaderboard`" in text
    first = next(line for line in text.splitlines() if line.startswith("| small"))
    assert first.startswith("| small | [robust-net v1](#/models/robust-net/versions/1) "
                            "(convnext_atto_cvst) | 3.37 |")
    assert "| 87.4 [52.9, 97.8] at 8/255 | 75.0 [40.9, 92.9] at 1 |" in first
    assert first.count("|") == 13  # 12 columns: narrow enough for MLflow's page
