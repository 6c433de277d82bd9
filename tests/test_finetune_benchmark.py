"""The robust fine-tuning benchmark (raytrain_at/finetune_benchmark,
``raytrain-at finetune-benchmark``).

Fast tests: the paper's benchmark file validates (180 configurations); mistakes fail before
anything runs with one line; aggregates; a benchmark whose rows all exist runs nothing and
rebuilds its table. The slow test runs a miniature benchmark for real (2 tiny timm backbones with
local checkpoints x bundled digits x 2 losses x 3 protocols = 12 Ray Tune studies with Ray Train
trials, AutoAttack and corruptions), checks the table, that a re-run adds nothing, and that
linear probing left the backbone bit-identical.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raytrain_at.errors import UserError
from raytrain_at.finetune_benchmark.runner import benchmark_folder, run_benchmark
from raytrain_at.finetune_benchmark.spec import configurations, load_benchmark
from raytrain_at.finetune_benchmark.table import MEASUREMENTS, aggregates, geometric_mean

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "finetune_benchmarks" / "robust_finetune.yaml"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYTRAIN_AT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RAYTRAIN_AT_CKPT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("RAYTRAIN_AT_HOME", str(tmp_path / "home"))


def _checkpoint(tmp_path: Path, name: str) -> Path:
    """A local 'pre-trained' checkpoint of a tiny timm model (1000-class head, as on the hub)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _mini_spec(tmp_path: Path, **changes) -> Path:
    data = {
        "description": "miniature benchmark",
        "recipe": "robust_finetune",
        "fixed": {"data.train_size": 64, "data.heldout_size": 32, "data.resolution": 32,
                  "data.loader_workers": 1, "schedule.global_batch_size": 32,
                  "scaling.use_gpu": False, "scaling.num_workers": 1,
                  "scaling.cpus_per_worker": 0.9, "attack.eps": "8/255", "attack.steps": 1,
                  "attack.heldout_steps": 2},
        "backbones": {
            "resnet": {"model": "test_resnet", "weights": str(_checkpoint(tmp_path, "test_resnet")),
                       "family": "convolutional", "pretraining": "random"},
            "vit": {"model": "test_vit", "weights": str(_checkpoint(tmp_path, "test_vit")),
                    "family": "attention", "pretraining": "random"}},
        "datasets": {"digits": {"train": "digits", "val": "digits", "test": "digits", "num_classes": 10}},
        "losses": ["adversarial", "trades"],
        "protocols": {"full_1ep": {"epochs": 1}, "full_2ep": {"epochs": 2},
                      "linear_2ep": {"epochs": 2, "linear_probe": True}},
        "search": {"optim.lr": {"choice": [1.0e-3]}, "optim.head_lr": {"choice": [3.0e-3]},
                   "optim.schedule": {"choice": ["cosine", "constant"]}},
        "num_samples": 1,
        "scheduler": {"kind": "fifo"},
        "evaluation": {"version": "fast", "n": 4, "workers": 1, "corruptions": True,
                       "eps": {"linf": "8/255", "l2": 1.0, "l1": 8.0}},
    }
    data.update(changes)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the paper's file
def test_paper_benchmark_validates() -> None:
    spec, source = load_benchmark(PAPER)
    configs = configurations(spec, "finetune-benchmark-robust_finetune", source)
    assert len(configs) == 5 * 6 * 2 * 3
    linear = next(c for c in configs if c.protocol == "linear_probe_50ep")
    fixed = linear.space.fixed
    assert fixed["model.linear_probe"] is True and fixed["schedule.epochs"] == 50
    trades = next(c for c in configs if c.loss == "trades").space
    config = trades.trial_config({"optim.lr": 1e-4, "optim.head_lr": 1e-3,
                                  "optim.weight_decay": 1e-4, "optim.head_weight_decay": 1e-4,
                                  "optim.schedule": "cosine"})
    assert config.objective.kind == "trades" and config.objective.trades_beta == 1.0
    assert config.attack.steps == 10 and config.attack.eps == pytest.approx(4 / 255)
    assert config.optim.betas == (0.9, 0.95)
    assert spec.evaluation.eps == {"linf": pytest.approx(4 / 255), "l2": 2.0, "l1": 75.0}
    assert spec.evaluation.corruptions and spec.evaluation.severity == 3


@pytest.mark.parametrize("change, culprit", [
    ({"search": {"optim.lrr": {"choice": [1.0e-3]}}}, "optim.lrr"),
    ({"losses": ["adversarial", "mart"]}, "mart"),
    ({"datasets": {"digits": {"train": "digits", "val": "digits", "test": "digits", "num_classes": 1}}},
     "num_classes"),
    ({"protocols": {"bad name": {"epochs": 1}}}, "bad name"),
    ({"backbones": {"x": {"model": "no_such_model", "weights": "/nope.safetensors"}}},
     "no_such_model"),
])
def test_bad_benchmark_fails_before_anything_runs(tmp_path, change, culprit) -> None:
    path = _mini_spec(tmp_path, **change)
    with pytest.raises(UserError, match=culprit):
        run_benchmark(path)
    assert not (tmp_path / "home" / "finetune_benchmarks").exists()


@pytest.mark.parametrize("command", ["finetune-benchmark", "benchmark"])
def test_missing_checkpoint_is_named_before_any_trial(tmp_path, capsys, command) -> None:
    """Also under the command's old name, which still works and says it moved."""
    from raytrain_at.cli import main

    path = _mini_spec(tmp_path, backbones={
        "resnet": {"model": "test_resnet", "weights": str(tmp_path / "missing.safetensors")}})
    with pytest.raises(SystemExit) as stopped:
        main([command, str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    moved = ["note: `raytrain-at benchmark` is now `raytrain-at finetune-benchmark`"]
    assert lines[:-1] == (moved if command == "benchmark" else [])
    assert "missing.safetensors" in lines[-1]
    assert not (tmp_path / "home" / "finetune_benchmarks").exists()


def test_aggregates() -> None:
    measured = {"clean_acc": 0.8, "robust_acc_linf": 0.4, "robust_acc_l2": 0.5,
                "robust_acc_l1": 0.2, "corruption_acc": 0.6}
    out = aggregates(measured)
    assert out["sum"] == pytest.approx(2.5)
    assert out["geometric_mean"] == pytest.approx((0.8 * 0.4 * 0.5 * 0.2 * 0.6) ** 0.2)
    assert geometric_mean([0.5, 0.0]) == 0.0


def test_finished_benchmark_runs_nothing(tmp_path) -> None:
    """Every row present: no configuration runs (no Ray, no MLflow), the table is rebuilt."""
    path = _mini_spec(tmp_path)
    spec, source = load_benchmark(path)
    keys = [c.key for c in configurations(spec, "finetune-benchmark-mini", source)]
    rows = benchmark_folder("mini", None) / "rows"
    rows.mkdir(parents=True)
    for index, key in enumerate(keys):
        backbone, dataset, loss, protocol = key.split(".")
        row = {"configuration": key, "backbone": backbone, "family": "f", "pretraining": "p",
               "dataset": dataset, "loss": loss, "protocol": protocol,
               **{m: 0.1 + 0.05 * index for m in MEASUREMENTS}}
        row.update(aggregates(row))
        (rows / f"{key}.json").write_text(json.dumps(row))
    outcome = run_benchmark(path)
    assert outcome.ran == [] and len(outcome.rows) == 12
    with open(outcome.results_csv) as handle:
        table = list(csv.DictReader(handle))
    assert [r["configuration"] for r in table] == keys
    assert outcome.plot.stat().st_size > 10_000


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_miniature_benchmark_end_to_end(tmp_path) -> None:
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from raytrain_at.model_refs import local_model_file

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, RAYTRAIN_AT_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=uri)
    path = _mini_spec(tmp_path)
    command = [sys.executable, "-m", "raytrain_at.cli", "finetune-benchmark", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=2400,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "home" / "finetune_benchmarks" / "mini"
    with open(folder / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert {(r["backbone"], r["loss"], r["protocol"]) for r in rows} == {
        (b, l, p) for b in ("resnet", "vit") for l in ("adversarial", "trades")
        for p in ("full_1ep", "full_2ep", "linear_2ep")}
    for column in (*MEASUREMENTS, "sum", "geometric_mean", "best.optim.schedule"):
        assert all(r[column] != "" for r in rows), column
    for row in rows:
        values = [float(row[m]) for m in MEASUREMENTS]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert float(row["sum"]) == pytest.approx(sum(values), abs=1e-3)
        assert float(row["robust_acc_linf"]) <= float(row["clean_acc"])
    assert (folder / "summary.png").stat().st_size > 10_000

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("finetune-benchmark-mini")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 12 and all(r.info.status == "FINISHED" for r in parents)
    assert {r.data.tags["raytrain_at.finetune_benchmark.protocol"] for r in parents} == {
        "full_1ep", "full_2ep", "linear_2ep"}

    # Linear probing: every backbone tensor of the fine-tuned model equals the checkpoint's.
    for backbone, name in (("resnet", "test_resnet"), ("vit", "test_vit")):
        original = load_file(str(tmp_path / f"{name}.safetensors"))
        row = next(r for r in rows if r["backbone"] == backbone and r["protocol"] == "linear_2ep")
        tuned = load_file(str(local_model_file(f"runs:/{row['best_run_id']}/model", uri)))
        body = {k.removeprefix("backbone."): v for k, v in tuned.items()}
        head = {k for k in original if original[k].shape != body.get(k, original[k]).shape}
        assert head, "the new head should differ in shape from the 1000-class one"
        frozen = [k for k in original if k not in head]
        assert frozen and all(torch.equal(original[k], body[k]) for k in frozen)
        full = next(r for r in rows if r["backbone"] == backbone and r["protocol"] == "full_2ep")
        changed = load_file(str(local_model_file(f"runs:/{full['best_run_id']}/model", uri)))
        changed = {k.removeprefix("backbone."): v for k, v in changed.items()}
        assert any(not torch.equal(original[k], changed[k]) for k in frozen)

    before = len(runs)
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                           cwd=tmp_path, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "12 rows (0 run now)" in again.stdout
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == before
    with open(folder / "results.csv") as handle:
        assert list(csv.DictReader(handle)) == rows
