"""The Tune driver (raytrain_at/tuning/study.py, report.py, ``python tune_stem.py``).

Fast tests check the pieces a study is made of (trial concurrency from cluster resources, trial
configs, command-line changes to a space, the results table, CSV and plot) and that mistakes fail
before Ray starts. The slow test runs ``python tune_stem.py`` with no arguments as a user would:
the quick ConvStem search on the bundled digits, with real Ray Tune / Train trials, ASHA, MLflow
runs, AutoAttack of the best trial and its registration.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytrain_at.config import flatten, load_config
from raytrain_at.errors import UserError
from raytrain_at.tuning.paper import comparison_rows, write_paper_comparison
from raytrain_at.tuning.report import plot_study, results_rows, trial_label, write_csv
from raytrain_at.tuning.spaces import load_space
from raytrain_at.tuning.study import (StudyOptions, TrialRecord, _searched, _TrialContext,
                                      apply_options, ranked, trial_concurrency, trial_config)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_space():
    return load_space(ROOT / "tune_spaces" / "quick_stems_cpu.yaml")


# --------------------------------------------------------------------------- concurrency
def test_concurrency_from_cpus_and_gpus() -> None:
    cpu = load_config("quickstart", ["scaling.cpus_per_worker=0.95"])
    assert trial_concurrency(cpu, {"CPU": 2.0}, local=True) == 1
    assert trial_concurrency(cpu, {"CPU": 8.0}, local=True) == 4
    gpu = load_config("quickstart", ["scaling.use_gpu=true", "scaling.num_workers=8",
                                     "schedule.global_batch_size=64"])
    assert trial_concurrency(gpu, {"CPU": 200.0, "GPU": 32.0}, local=False) == 4
    # An autoscaling cluster shows no GPU before the first request: still one trial at a time.
    assert trial_concurrency(gpu, {"CPU": 16.0}, local=False) == 1


def test_workers_that_cannot_fit_beside_the_trial_fail_clearly() -> None:
    # 2 workers x 1 CPU fill 2 cores: the trial function's 0.01 CPU leaves them unplaceable.
    config = load_config("quickstart")
    with pytest.raises(UserError, match=r"needs 2 CPUs .* scaling.cpus_per_worker"):
        trial_concurrency(config, {"CPU": 2.0}, local=True)


# --------------------------------------------------------------------------- trial configs
def test_trial_config_is_the_space_config(quick_space) -> None:
    base = load_config(quick_space.recipe, values=quick_space.fixed)
    context = _TrialContext("s", quick_space, base.model_dump(mode="json"), "/tmp/x", "p")
    for stem in ("table7:2", "table7:6"):
        # Nested as Ray Tune hands it to the trial; dotted as a TrialRecord keeps it.
        ours = trial_config(context, {"model": {"stem": stem}})
        assert ours.model.stem == stem
        assert ours == trial_config(context, {"model.stem": stem})
        assert flatten(ours) == flatten(quick_space.trial_config({"model.stem": stem}))


def test_records_keep_the_nested_tune_config_as_searched_keys(quick_space) -> None:
    # Ray Tune reports a trial's config nested, as the param space is; the table and CSV columns
    # are the searched dotted keys, and the record's sample rebuilds the same trial config.
    params = {"model": {"stem": "table7:3"}}
    sample = _searched(quick_space, params)
    assert sample == {"model.stem": "table7:3"}
    record = TrialRecord("t9", sample, {}, 0, "errored", error="x")
    assert results_rows([record], quick_space)[0]["model.stem"] == "table7:3"
    assert quick_space.trial_config(record.sample) == quick_space.trial_config(params)


def test_command_line_changes_are_validated(quick_space) -> None:
    fifo = apply_options(quick_space, StudyOptions(scheduler="fifo", num_samples=2))
    assert fifo.scheduler.kind == "fifo" and fifo.num_trials() == 10
    assert quick_space.scheduler.kind == "asha"  # the loaded space is not changed
    with pytest.raises(UserError, match="no_such_recipe"):
        apply_options(quick_space, StudyOptions(recipe="no_such_recipe"))
    with pytest.raises(UserError, match="--num-samples 0"):
        apply_options(quick_space, StudyOptions(num_samples=0))


def test_space_evaluation_section(tmp_path, quick_space) -> None:
    assert quick_space.evaluation.eps["linf"] == pytest.approx(8 / 255)
    assert quick_space.evaluation.norms == ["linf", "l2", "l1"]
    data = yaml.safe_load((ROOT / "tune_spaces" / "quick_stems_cpu.yaml").read_text())
    data["evaluation"]["eps"]["l5"] = 1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="evaluation.eps"):
        load_space(path)


# --------------------------------------------------------------------------- the report
def _records() -> list[TrialRecord]:
    return [
        TrialRecord("t0", {"model.stem": "table7:1"}, {"heldout_robust_accuracy": 0.30,
                                                        "heldout_clean_accuracy": 0.5}, 3,
                    "completed", run_id="r0"),
        TrialRecord("t1", {"model.stem": "table7:6"}, {"heldout_robust_accuracy": 0.45}, 3,
                    "completed", run_id="r1",
                    evaluation={"clean_acc": 0.9, "robust_acc_linf": 0.4, "robust_acc_l2": 0.5,
                                "robust_acc_l1": 0.3}),
        TrialRecord("t2", {"model.stem": "table7:2"}, {"heldout_robust_accuracy": 0.60}, 1,
                    "stopped early", run_id="r2"),
        TrialRecord("t3", {"model.stem": "table7:4"}, {}, 0, "errored", error="boom"),
    ]


def test_ranking_uses_completed_trials_only(quick_space) -> None:
    order = [r.trial_id for r in ranked(_records(), quick_space)]
    assert order == ["t1", "t0"]  # t2 scored higher but ASHA stopped it: not a finished model


def test_results_csv_and_plot(tmp_path, quick_space) -> None:
    records = _records()
    rows = results_rows(records, quick_space)
    assert [r["trial_id"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert rows[1]["autoattack_robust_acc_l2"] == "0.5000"
    assert rows[2]["status"] == "stopped early" and rows[3]["error"] == "boom"
    path = write_csv(records, quick_space, tmp_path / "results.csv")
    with open(path) as handle:
        read = list(csv.DictReader(handle))
    assert read[0]["model.stem"] == "table7:1" and read[0]["heldout_robust_accuracy"] == "0.3000"
    plot = plot_study(records, quick_space, tmp_path / "study.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert trial_label(records[0]) == "table7:1"


# --------------------------------------------------------------------------- paper mode
# A paper-mode space on the digits: two rows of a three-point grid, one Ray Train worker per
# trial (so the two trials run side by side on 2 cores), one short epoch each, then APGD-T
# (the paper's cheaper protocol) on 4 test digits in l_inf, l_2 and l_1 for every trial.
PAPER_SPACE = {
    "description": "Paper mode on the digits: two rows of a three-point grid",
    "recipe": "quickstart",
    "fixed": {"schedule.epochs": 1, "schedule.global_batch_size": 32, "data.train_size": 96,
              "data.heldout_size": 32, "attack.heldout_steps": 1,
              "tracking.experiment": "tune-paper-mode", "scaling.num_workers": 1,
              "scaling.cpus_per_worker": 0.95},
    "search": {"optim.weight_decay": {"grid": [0.05, 0.5, 0.005]}},
    "scheduler": {"kind": "fifo"},
    "evaluation": {"n": 4, "version": "apgdt", "norms": ["linf", "l2", "l1"],
                   "eps": {"linf": "8/255", "l2": 1.0, "l1": 8.0}, "top": "all", "workers": 1,
                   "register_best": False},
    "paper": {"table": "Digits table", "rows": [
        {"label": "wd 0.05", "point": {"optim.weight_decay": 0.05},
         "clean": 90.0, "linf": 80.0, "l2": 70.0, "l1": 60.0},
        {"label": "wd 0.5", "point": {"optim.weight_decay": 0.5}, "linf": 75.0}]},
}


@pytest.fixture()
def paper_space(tmp_path):
    path = tmp_path / "digits_paper.yaml"
    path.write_text(yaml.safe_dump(PAPER_SPACE, sort_keys=False))
    return load_space(path)


def test_paper_comparison_sets_every_row_beside_its_trial(tmp_path, paper_space) -> None:
    records = [
        TrialRecord("t1", {"optim.weight_decay": 0.5}, {"heldout_robust_accuracy": 0.4}, 1,
                    "completed", evaluation={"clean_acc": 0.9, "robust_acc_linf": 0.7,
                                             "robust_acc_l2": 0.6, "robust_acc_l1": 0.5}),
        TrialRecord("t2", {"optim.weight_decay": 0.005}, {}, 1, "completed"),  # not a row
    ]
    rows = comparison_rows(records, paper_space)
    assert [r["row"] for r in rows] == ["wd 0.05", "wd 0.5", "(not in the table)"]
    assert rows[0]["status"] == "not run" and rows[0]["paper_robust_acc_l1"] == "60.0"
    assert (rows[1]["trial"], rows[1]["ours_robust_acc_linf"], rows[1]["paper_robust_acc_linf"],
            rows[1]["diff_robust_acc_linf"]) == ("t1", "70.0", "75.0", "-5.0")
    assert rows[1]["paper_clean_acc"] == "" and rows[1]["diff_clean_acc"] == ""
    assert rows[2]["trial"] == "t2" and rows[2]["paper_robust_acc_linf"] == ""
    written = write_paper_comparison(records, paper_space, tmp_path, quiet=True)
    with open(written.csv) as handle:
        assert [r["row"] for r in csv.DictReader(handle)] == [r["row"] for r in rows]
    assert written.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written.columns["row"] == [r["row"] for r in rows]
    # Every completed trial is evaluated in paper mode, the best only in the fast mode.
    assert paper_space.evaluation.count(7) == 7
    assert paper_space.evaluation.model_copy(update={"top": 1}).count(7) == 1


@pytest.mark.slow
def test_paper_mode_end_to_end_evaluates_every_trial_in_three_norms(tmp_path) -> None:
    """``raytrain-at tune`` on a paper-mode space: only the table's rows run (2 of the grid's
    3 points), each to its last epoch, each evaluated in l_inf, l_2 and l_1 with its numbers on
    its own MLflow run, and the comparison with the paper printed and logged (CSV, PNG, MLflow
    table). About 3 minutes on 2 cores; CI's slow list runs it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path / "digits_paper.yaml"
    path.write_text(yaml.safe_dump(PAPER_SPACE, sort_keys=False))
    home = tmp_path / "home"
    done = _tune_cli(["--space", str(path), "--name", "paper-e2e"], tmp_path, home, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Digits table: ours / paper" in done.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("tune-paper-mode")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["study_mode"] == "paper" and len(children) == 2
    for child in children:
        metrics = child.data.metrics
        for key in ("autoattack_clean_acc", "autoattack_robust_acc_linf",
                    "autoattack_robust_acc_l2", "autoattack_robust_acc_l1"):
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
        assert metrics["epoch"] == 1 and child.info.status == "FINISHED"
        assert child.data.tags["raytrain_at.tune.evaluation"] == "apgdt"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"paper_comparison.csv", "paper_comparison.png", "paper_comparison.json"} <= artifacts
    with open(home / "tune" / "paper-e2e" / "paper_comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["row"] for r in rows] == ["wd 0.05", "wd 0.5"]
    for row in rows:
        assert row["status"] == "completed" and row["epochs"] == "1"
        assert all(row[f"ours_robust_acc_{norm}"] for norm in ("linf", "l2", "l1"))
    assert rows[0]["paper_robust_acc_l2"] == "70.0" and rows[1]["paper_robust_acc_linf"] == "75.0"


def test_printed_table_shows_autoattack_intervals(quick_space, capsys) -> None:
    """The best trials' AutoAttack on 16 images reads as what it is: each accuracy with its
    95 % Wilson interval (the CSV keeps the plain number)."""
    from raytrain_at.tuning.report import print_table

    records = _records()
    records[1].evaluation_n = 16
    print_table(records, quick_space, "study")
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("│ t1"))
    cells = [c.strip() for c in lines[row].split("│")[1:-1]]
    below = [c.strip() for c in lines[row + 1].split("│")[1:-1]]
    assert cells[-5:-1] == ["90.0", "40.0", "50.0", "30.0"]  # AA clean, l_inf, l_2, l_1 (%)
    assert below[-3] == "[28.0, 72.0]" and below[-2] == "[14.2, 55.6]"  # 8/16, 5/16
    assert "95 % Wilson interval" in " ".join(lines)
    assert results_rows(records, quick_space)[1]["autoattack_robust_acc_l2"] == "0.5000"


# --------------------------------------------------------------------------- errors
def _tune_cli(args: list[str], cwd: Path, env_home: Path, timeout: int = 120):
    env = dict(os.environ, RAYTRAIN_AT_HOME=str(env_home),
               MLFLOW_TRACKING_URI=f"sqlite:///{env_home}/mlflow.db")
    return subprocess.run([sys.executable, str(ROOT / "tune_stem.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _tune_in_process(args: list[str], cwd: Path, home: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``tune_stem.py ARGS`` in this process (the same ``main`` the script calls), for the
    checks that must stop before Ray: (exit code, stderr)."""
    from raytrain_at.cli import main

    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as stopped:
        main(["tune", *args])
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, culprit", [
    (["--space", "no_such_space"], "unknown search space 'no_such_space'"),
    (["--scheduler", "hyperband"], "--scheduler 'hyperband'"),
    (["--recipe", "nope"], "nope"),
    (["--name", "bad name!"], "study name 'bad name!'"),
    (["--name", ".."], "study name '..'"),
    (["--name", "a/b"], "study name 'a/b'"),
])
def test_bad_input_fails_before_any_trial(tmp_path, monkeypatch, capsys, args, culprit) -> None:
    import ray

    code, err = _tune_in_process(args, ROOT, tmp_path / "home", monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and culprit in lines[0], err
    assert not (tmp_path / "home" / "tune").exists()  # no study folder, no trial
    assert not ray.is_initialized()


def test_unknown_key_in_a_space_fails_before_any_trial(tmp_path) -> None:
    # As a user runs it: the script, from a folder of their own.
    data = yaml.safe_load((ROOT / "tune_spaces" / "quick_stems_cpu.yaml").read_text())
    data["search"] = {"model.stme": {"grid": ["table7:1", "table7:2"]}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    done = _tune_cli(["--space", str(path)], tmp_path, tmp_path / "home")
    assert done.returncode == 2
    assert "model.stme" in done.stderr and "model.stem" in done.stderr  # the close-match hint
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "tune").exists()


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_default_study_end_to_end(tmp_path) -> None:
    """``python tune_stem.py`` with no arguments: >= 4 Table 7 stems as real Tune trials, ASHA
    stops at least one, every trial an MLflow child run, table, plot, best evaluated and
    registered (about 10 minutes on 2 cores)."""
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    (work / "tune_spaces").symlink_to(ROOT / "tune_spaces")
    home = tmp_path / "home"
    done = _tune_cli([], work, home, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quick_stems_cpu: 5 trials, metric heldout_robust_accuracy" in done.stdout
    study = next((home / "tune").glob("quick_stems_cpu-*"))
    with open(study / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 4
    assert len({r["model.stem"] for r in rows}) == len(rows)
    assert all(r["model.stem"].startswith("table7:") for r in rows)
    assert any(r["status"] == "stopped early" for r in rows)
    assert all(r["status"] != "errored" for r in rows)
    assert (study / "study.png").stat().st_size > 10_000

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("tune-quick-stems")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(rows)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    stopped = [r for r in children if "raytrain_at.tune.stopped_early" in r.data.tags]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "study.png"} <= artifacts

    best_run = parents[0].data.tags["raytrain_at.tune.best_run"]
    versions = client.search_model_versions("name = 'tune-quick_stems_cpu'")
    assert len(versions) == 1
    assert client.get_logged_model(versions[0].source.split("/")[-1]).tags.get(
        "weights_sha256")
    best_row = next(r for r in rows if r["mlflow_run_id"] == best_run)
    assert best_row["status"] == "completed"
    assert float(best_row["autoattack_robust_acc_l2"]) >= 0.0
    completed = [float(r["heldout_robust_accuracy"]) for r in rows if r["status"] == "completed"]
    assert float(best_row["heldout_robust_accuracy"]) == max(completed)
