"""Registry: register -> load by alias, champion aliases, parallel registrations, numeric search,
and one-line errors that register nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import raytrain_at
from raytrain_at.cli import app, main
from raytrain_at.models.model_files import ModelSpec, load_model_file, save_model_file
from raytrain_at.registry.register import leaderboard, register_model
from raytrain_at.registry.mlflow_registry import ModelRegistry
from tests.support.cli_runner import run_cli



@pytest.fixture(scope="module")
def weak_model_file(tmp_path_factory) -> str:
    """An untrained test_resnet (chance accuracy): the model that must not take an alias."""
    torch.manual_seed(1)
    spec = ModelSpec(name="test_resnet", num_classes=10, resolution=16, crop_pct=1.0)
    path = tmp_path_factory.mktemp("weak") / "model.safetensors"
    save_model_file(path, spec.build().eval(), spec)
    return str(path)


def _evaluate(model: str, out: Path, state: Path) -> Path:
    result = CliRunner().invoke(app, [
        "evaluate", model, "--data", "digits", "--norms", "linf,l2", "--version", "apgdt",
        "--n", "16", "--batch-size", "16", "--out", str(out), "--state-dir", str(state)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def evaluations(robust_model_file, weak_model_file, eval_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evals")
    return {"strong": _evaluate(robust_model_file, tmp / "strong.json", tmp / "state"),
            "weak": _evaluate(weak_model_file, tmp / "weak.json", tmp / "state")}


def test_register_then_load_by_alias_gives_identical_outputs(store, robust_model_file,
                                                             evaluations):
    done = register_model(robust_model_file, "digits-net", eval_path=evaluations["strong"])
    assert done.version == "1" and "champion-linf" in done.aliases_taken
    by_alias = raytrain_at.load_model("models:/digits-net@champion-linf")
    by_version = raytrain_at.load_model("models:/digits-net/1")
    original = load_model_file(robust_model_file).module
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        expected = original(x)
        assert torch.equal(by_alias(x), expected)
        assert torch.equal(by_version(x), expected)


def test_better_model_takes_the_alias_and_worse_does_not(store, robust_model_file,
                                                         weak_model_file, evaluations):
    weak = register_model(weak_model_file, "net", eval_path=evaluations["weak"])
    assert weak.aliases_taken == ["champion-linf", "champion-l2"]  # nobody held them
    strong = register_model(robust_model_file, "net", eval_path=evaluations["strong"])
    assert strong.aliases_taken == ["champion-linf", "champion-l2"]
    again = register_model(weak_model_file, "net", eval_path=evaluations["weak"])
    assert again.aliases_taken == [] and again.version == "3"
    registry = ModelRegistry()
    holder = registry.resolve("models:/net@champion-linf")
    assert str(holder.version) == strong.version
    # Every move is one line of one history file, oldest first; no tag per move.
    moves = [line.split("  ", 1)[1] for line in registry.alias_history("net")
             if "champion-linf" in line]
    assert moves == [f"champion-linf moved from nobody to v1 "
                     f"(robust_acc_linf {registry_metric(weak):.4f})",
                     f"champion-linf moved from v1 to v2 "
                     f"(robust_acc_linf {registry_metric(strong):.4f})"]
    tags = registry.client.get_registered_model("net").tags
    assert not [k for k in tags if k.startswith("alias_log")], tags
    assert len(registry.alias_history("net")) == 4  # linf and l2: nobody -> v1 -> v2
    rows = leaderboard("linf", name="net")
    assert [r["version"] for r in rows][0] == 2  # best first
    assert rows[0]["params"]["architecture"] == "test_resnet"
    assert float(rows[0]["params"]["params_m"]) == pytest.approx(0.37, abs=0.01)


def registry_metric(registration) -> float:
    registry = ModelRegistry()
    return {m.key: m.value for m in registry.client.get_logged_model(
        registration.model_id).metrics}["robust_acc_linf"]


def test_metrics_are_searchable_numerically(store, robust_model_file, weak_model_file,
                                            evaluations):
    strong = register_model(robust_model_file, "search-net", eval_path=evaluations["strong"])
    weak = register_model(weak_model_file, "search-net", eval_path=evaluations["weak"])
    found = {m.model_id for m in ModelRegistry().search("metrics.robust_acc_linf > 0.4")}
    assert strong.model_id in found and weak.model_id not in found


def test_four_parallel_registrations_get_four_versions(store, robust_model_file):
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, HF_HUB_OFFLINE="1")
    # Create the store first: four processes creating MLflow's tables at once is not the point.
    ModelRegistry().client.search_experiments()
    # Four processes at once (forked from one that has the imports done).
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda _: run_cli(["register", robust_model_file, "--name",
                                                "parallel", "--unevaluated"], env=env,
                                               timeout=300), range(4)))
    assert [d.returncode for d in done] == [0] * 4, [d.stderr[-800:] for d in done]
    versions = sorted(int(v.version) for v in
                      ModelRegistry().client.search_model_versions("name = 'parallel'"))
    assert versions == [1, 2, 3, 4]


def _bad_inputs(tmp_path: Path, model: str, result: Path):
    no_spec = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(no_spec))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    wrong_format = tmp_path / "other.json"
    wrong_format.write_text(json.dumps({"format": "something-else"}))
    truncated = tmp_path / "truncated.json"
    data = json.loads(result.read_text())
    del data["threats"]
    truncated.write_text(json.dumps(data))
    return [
        (["runs:/0123456789abcdef/model", "--unevaluated"], "runs:/0123456789abcdef/model"),
        (["models:/no-such-model@champion-linf", "--unevaluated"], "no-such-model"),
        (["models:/net@no-such-alias", "--unevaluated"], "no-such-alias"),
        ([str(no_spec), "--unevaluated"], "no model metadata"),
        ([model, "--eval", str(garbage)], "is not JSON"),
        ([model, "--eval", str(wrong_format)], "not a raytrain-at evaluation"),
        ([model, "--eval", str(truncated)], "threats"),
        ([model], "--unevaluated"),
        (["models:/nosuch@champion-linf", "--unevaluated"], "'models:/nosuch@champion-linf'"),
        (["models:/net/99", "--unevaluated"], "'models:/net/99'"),
    ]


def test_bad_input_gives_one_line_errors_and_registers_nothing(
        store, robust_model_file, evaluations, tmp_path, monkeypatch, capsys):
    register_model(robust_model_file, "net", eval_path=evaluations["strong"])
    registry = ModelRegistry()
    before = len(registry.client.search_model_versions())
    capsys.readouterr()  # MLflow's own log lines from creating the store above
    for args, fragment in _bad_inputs(tmp_path, robust_model_file, evaluations["strong"]):
        monkeypatch.setattr(sys, "argv", ["raytrain-at", "register", *args, "--name", "net"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert fragment in lines[0], (args, lines)
    assert len(registry.client.search_model_versions()) == before


def test_untrustworthy_evaluation_is_refused_unless_forced(store, robust_model_file,
                                                           evaluations, tmp_path):
    data = json.loads(Path(evaluations["strong"]).read_text())
    data["trustworthy"] = False
    data["guards"][0]["passed"] = False
    flagged = tmp_path / "flagged.json"
    flagged.write_text(json.dumps(data))
    with pytest.raises(raytrain_at.UserError, match="failed guards"):
        register_model(robust_model_file, "guarded", eval_path=flagged)
    done = register_model(robust_model_file, "guarded", eval_path=flagged, force=True)
    version = ModelRegistry().client.get_model_version("guarded", done.version)
    assert version.tags["forced"] == "true" and version.tags["trustworthy"] == "false"
    assert done.aliases_taken == []  # a forced version never becomes a champion


def test_leaderboard_command_prints_table2_columns(store, robust_model_file, weak_model_file,
                                                   evaluations):
    register_model(weak_model_file, "board", eval_path=evaluations["weak"])
    register_model(robust_model_file, "board", eval_path=evaluations["strong"])
    shown = CliRunner().invoke(app, ["leaderboard", "--norm", "l2", "--size", "small"],
                               catch_exceptions=False, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.output.splitlines() if "board v" in line]
    assert [line.split("│")[1].strip() for line in lines] == ["board v2", "board v1"]
    assert "champion: linf, l2" in lines[0]
    for column in ("params (M)", "FLOPs (G)", "epochs", "steps", "clean", "l_inf", "l_2", "l_1"):
        assert column in shown.output
    assert "[low, high]: 95 % Wilson interval over n images" in " ".join(shown.output.split())
    empty = CliRunner().invoke(app, ["leaderboard", "--size", "large"], catch_exceptions=False)
    assert "board v" not in empty.output
    with pytest.raises(raytrain_at.UserError, match="unknown norm 'l3'"):
        leaderboard("l3")
    # --threat is the old name of --norm: it still works, and help no longer shows it.
    old = CliRunner().invoke(app, ["leaderboard", "--threat", "l2", "--size", "small"],
                             catch_exceptions=False, terminal_width=200)
    assert old.output == shown.output
    usage = CliRunner().invoke(app, ["leaderboard", "--help"], terminal_width=200).output
    assert "--norm" in usage and "--threat" not in usage and "html" in usage


def test_leaderboard_formats_carry_radius_data_and_n(store, robust_model_file, evaluations,
                                                     monkeypatch, capsys):
    register_model(robust_model_file, "fmt", eval_path=evaluations["strong"])
    result = json.loads(Path(evaluations["strong"]).read_text())
    shown = CliRunner().invoke(app, ["leaderboard", "--format", "json"], catch_exceptions=False)
    [item] = json.loads(shown.output)
    assert item["model"] == "fmt" and item["n"] == result["data"]["n"] == 16
    assert item["data"] == Path(result["data"]["path"]).name
    assert item["eps_linf"] == pytest.approx(result["threats"]["linf"]["eps"], rel=1e-5)
    assert item["robust_acc_l2"] == result["threats"]["l2"]["robust_accuracy"]
    assert item["eps_l1"] is None and item["robust_acc_l1"] is None  # not evaluated
    as_csv = CliRunner().invoke(app, ["leaderboard", "--format", "csv"], catch_exceptions=False)
    [row] = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert row["n"] == "16" and float(row["eps_l2"]) == pytest.approx(item["eps_l2"])
    as_md = CliRunner().invoke(app, ["leaderboard", "--format", "markdown"],
                               catch_exceptions=False).output.splitlines()
    assert "| eps l_inf |" in as_md[0] and as_md[1].startswith("|---|")
    eps255 = round(item["eps_linf"] * 255)
    assert f"| {eps255}/255 |" in as_md[2] and "| 16 |" in as_md[2]
    # Not a terminal and no COLUMNS: as wide as the table needs (nothing cut); COLUMNS wins.
    monkeypatch.delenv("COLUMNS", raising=False)
    wide = CliRunner().invoke(app, ["leaderboard"], catch_exceptions=False).output
    assert "champion: linf, l2" in wide and max(map(len, wide.splitlines())) > 120
    monkeypatch.setenv("COLUMNS", "90")
    narrow = CliRunner().invoke(app, ["leaderboard"], catch_exceptions=False).output
    assert max(map(len, narrow.splitlines())) <= 90
    for args, fragment in ((["--name", "nosuch"], "--name 'nosuch'"),
                           (["--format", "xml"], "--format 'xml'")):
        monkeypatch.setattr(sys, "argv", ["raytrain-at", "leaderboard", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_version_hangs_off_its_training_run(store, robust_model_file, eval_home, tmp_path):
    """Lineage: version, logged model, evaluation JSON, dataset input and metrics all belong to
    the training run named in the model file; guards are one JSON artifact plus one tag."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file, save_file

    client = MlflowClient(tracking_uri=store)
    training = client.create_run(client.create_experiment("training")).info.run_id
    trained = tmp_path / "trained" / "model.safetensors"
    trained.parent.mkdir()
    from raytrain_at.models.model_files import read_model_spec

    spec, meta = read_model_spec(robust_model_file)
    save_file(load_file(robust_model_file), str(trained), metadata=dict(
        meta, **{"raytrain_at.model_spec": spec.to_json(), "raytrain_at.source_run": training}))
    evaluation = _evaluate(str(trained), tmp_path / "eval.json", tmp_path / "state")
    done = register_model(str(trained), "lineage", eval_path=evaluation)
    version = client.get_model_version("lineage", done.version)
    assert version.run_id == done.run_id == training
    logged = client.get_logged_model(done.model_id)
    assert logged.source_run_id == training
    assert not [k for k in version.tags if k.startswith("guard.")]
    assert version.tags["trustworthy"] == "true"
    model_files = {Path(a.path).name for a in client.list_logged_model_artifacts(done.model_id)}
    assert {"guards.json", "eval.json", "MLmodel", "model.safetensors"} <= model_files
    run = client.get_run(training)
    assert [Path(a.path).name for a in client.list_artifacts(
        training, f"evaluation/{done.model_id}")] == ["eval.json"]
    [dataset_input] = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest and "n16" in dataset.name
    linked = {m.key: (m.dataset_name, m.dataset_digest) for m in logged.metrics}
    assert linked["robust_acc_linf"] == (dataset.name, dataset.digest)


def test_robustbench_model_info_of_an_evaluation(evaluations, robust_model_file, tmp_path,
                                                  monkeypatch, capsys):
    from raytrain_at.evaluation.result import read_result
    from raytrain_at.evaluation.robustbench_info import write_model_info

    info_path = write_model_info(read_result(evaluations["strong"]), tmp_path / "rb.json")
    info = json.loads(info_path.read_text())
    result = json.loads(Path(evaluations["strong"]).read_text())
    assert set(info) == {"Linf", "L2"}
    linf = result["threats"]["linf"]
    assert info["Linf"]["threat_model"] == "Linf" and info["Linf"]["n"] == 16
    assert info["Linf"]["eps"] == f"{round(linf['eps'] * 255)}/255"
    assert info["L2"]["eps"] == f"{result['threats']['l2']['eps']:g}"
    assert info["Linf"]["autoattack_acc"] == f"{100 * linf['robust_accuracy']:.2f}"
    assert info["Linf"]["clean_acc"] == f"{100 * linf['clean_accuracy']:.2f}"
    assert info["Linf"]["unreliable"] is True  # not the standard AutoAttack
    assert info["Linf"]["data"] == result["data"]["path"]
    # The command checks the file before any attack runs.
    monkeypatch.setattr(sys, "argv", [
        "raytrain-at", "evaluate", robust_model_file, "--data", "digits",
        "--robustbench-json", str(tmp_path / "no" / "such" / "x.json")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines


def test_pages_are_written_at_registration(store, robust_model_file, weak_model_file,
                                           evaluations):
    """The version's description is its report card, the registered model's names the
    champions above its versions, and the leaderboard model's lists every version; per-move
    ``alias_log.*`` tags of older versions are folded into the history file and deleted."""
    from raytrain_at.evaluation.result import read_result
    from raytrain_at.registry.mlflow_registry import LEADERBOARD_MODEL

    registry = ModelRegistry()
    client = registry.client
    weak = register_model(weak_model_file, "pages", eval_path=evaluations["weak"])
    client.set_registered_model_tag("pages", "alias_log.champion-l1.1796589690782",
                                    "champion-l1 moved from nobody to v0 (robust_acc_l1 0.6250)")
    strong = register_model(robust_model_file, "pages", eval_path=evaluations["strong"])
    result = read_result(evaluations["strong"])
    card = client.get_model_version("pages", strong.version).description
    linf, l2 = result.threats["linf"], result.threats["l2"]
    assert card.splitlines()[0].startswith(
        f"clean {100 * result.clean_accuracy:.1f} %, l_inf {100 * linf.robust_accuracy:.1f} %")
    low, high = linf.robust_interval
    assert (f"| l_inf | {100 * linf.robust_accuracy:.1f} % ({round(linf.robust_accuracy * 16)}"
            f"/16) | [{100 * low:.1f}, {100 * high:.1f}] | 4/255 |") in card
    assert f"| l_2 | {100 * l2.robust_accuracy:.1f} %" in card and "**n = 16**" in card
    assert "AutoAttack apgdt" in card and "guards passed" in card
    assert "Table 2 (small)" in card  # the size class's reference row beside ours
    assert f"name=pages&version={strong.version}&path=strong.json" in card
    # The links point at files the server really has.
    names = {Path(a.path).name for a in client.list_logged_model_artifacts(strong.model_id)}
    assert {"strong.json", "guards.json"} <= names
    model = client.get_registered_model("pages")
    assert f"| l_inf | [v{strong.version}](#/models/pages/versions/{strong.version}) |" in \
        model.description
    assert model.description.index("[v2](") < model.description.index("[v1](")
    assert not [k for k in model.tags if k.startswith("alias_log")]
    history = registry.alias_history("pages")
    assert any("to v0" in line for line in history)  # the folded legacy tag
    assert history[-1].endswith(f"to v{strong.version} (robust_acc_l2 {l2.robust_accuracy:.4f})")
    board = client.get_registered_model(LEADERBOARD_MODEL).description
    assert board.index(f"[pages v{strong.version}]") < board.index(f"[pages v{weak.version}]")
    assert client.search_model_versions(f"name = '{LEADERBOARD_MODEL}'") == []
    # The same weights again with an evaluation: the earlier version's card points to it.
    again = register_model(robust_model_file, "pages", eval_path=evaluations["strong"])
    earlier = client.get_model_version("pages", strong.version).description.splitlines()
    assert earlier[2].startswith("**Re-evaluated**") and f"[v{again.version}]" in earlier[2]
    assert "Re-evaluated" not in client.get_model_version("pages", weak.version).description
