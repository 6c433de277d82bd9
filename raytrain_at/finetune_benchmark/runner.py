"""``raytrain-at finetune-benchmark SPEC``: run every configuration of a benchmark, resumably.

Each configuration is a Ray Tune study (:func:`raytrain_at.tuning.study.run_study`): its trials
fine-tune the backbone with different backbone / head learning rates, weight decays and
schedules, ASHA stops the weak ones, and the best completed trial is evaluated (clean,
AutoAttack l_inf / l_2 / l_1, corruptions). The study's parent MLflow run is the
configuration's run (tagged with backbone, dataset, loss and protocol); its trials are children.

Resuming: a configuration's row is written (atomically) only after its evaluation, into
``<home>/finetune_benchmarks/<name>/rows/``; a re-run skips every configuration that has a row and
rebuilds the table, so an interrupted benchmark goes on where it stopped and a finished one adds
nothing. A configuration interrupted mid-way is run again from its start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain_at.errors import UserError
from raytrain_at.finetune_benchmark.spec import Configuration, configurations, load_benchmark
from raytrain_at.finetune_benchmark.table import (aggregates, plot_summary, print_table, read_rows,
                                                  write_csv, write_row)
from raytrain_at.runtime.storage import default_home

log = logging.getLogger(__name__)


@dataclass
class BenchmarkOutcome:
    name: str
    rows: list[dict[str, Any]]
    ran: list[str]  # configurations run now (the others were already done)
    results_csv: Path
    plot: Path


def benchmark_folder(name: str, storage_path: str | None) -> Path:
    local = (Path(storage_path).expanduser().resolve()
             if storage_path and "://" not in storage_path else default_home())
    return local / "finetune_benchmarks" / name


def _row(config: Configuration, outcome) -> dict[str, Any]:
    best = outcome.best
    measured = {k: v for k, v in best.evaluation.items()}
    return {
        "configuration": config.key, "backbone": config.backbone, "family": config.family,
        "pretraining": config.pretraining, "dataset": config.dataset, "loss": config.loss,
        "protocol": config.protocol, **measured, **aggregates(measured),
        **{f"best.{k}": v for k, v in best.sample.items()},
        "trials": len(outcome.records), "mlflow_run_id": outcome.parent_run_id,
        "best_run_id": best.run_id,
    }


def check_inputs(pending: list[Configuration], storage_path: str | None) -> None:
    """Every backbone checkpoint and dataset file of the configurations still to run loads and
    fits its model, before the first one starts (one check per backbone and dataset pair)."""
    from raytrain_at.training.launch import prepare_run

    seen = set()
    for config in pending:
        if (config.backbone, config.dataset) in seen:
            continue
        seen.add((config.backbone, config.dataset))
        first = {key: dist.first for key, dist in config.space.search.items()}
        try:
            prepare_run(config.space.trial_config(first), storage_path=storage_path)
        except UserError as exc:
            raise UserError(f"benchmark configuration {config.key}: {exc}") from None


def run_benchmark(path: str | Path, *, name: str | None = None, address: str | None = None,
                  storage_path: str | None = None) -> BenchmarkOutcome:
    """Run (or resume) a benchmark file; see the module docstring.

    Raises:
        UserError: a bad file or configuration (before anything runs), or a configuration
            whose every trial failed.
    """
    from raytrain_at.tuning.study import StudyOptions, run_study

    spec, source = load_benchmark(path)
    name = name or source.stem
    if not all(c.isalnum() or c in "._-" for c in name):
        raise UserError(f"benchmark name {name!r} may only use letters, digits, '.', '_' and '-'")
    experiment = f"finetune-benchmark-{name}"
    configs = configurations(spec, experiment, source)
    folder = benchmark_folder(name, storage_path)
    rows_dir = folder / "rows"
    ran = []
    pending = [c for c in configs if not (rows_dir / f"{c.key}.json").is_file()]
    check_inputs(pending, storage_path)
    log.info("benchmark %s: %d configurations, %d to run", name, len(configs), len(pending))
    for index, config in enumerate(pending, 1):
        print(f"[{index}/{len(pending)}] {config.key}", flush=True)
        outcome = run_study(config.space, StudyOptions(
            name=f"{name}.{config.key}", address=address, storage_path=storage_path,
            quiet=True, tags={"raytrain_at.finetune_benchmark": name,
                              "raytrain_at.finetune_benchmark.backbone": config.backbone,
                              "raytrain_at.finetune_benchmark.dataset": config.dataset,
                              "raytrain_at.finetune_benchmark.loss": config.loss,
                              "raytrain_at.finetune_benchmark.protocol": config.protocol}))
        if outcome.best is None:
            raise UserError(f"benchmark {name}: configuration {config.key} has no completed, "
                            "evaluated trial")
        write_row(_row(config, outcome), rows_dir / f"{config.key}.json")
        ran.append(config.key)
    rows = read_rows(rows_dir, [c.key for c in configs])
    print_table(rows, f"{name}: {len(rows)} configurations ({len(ran)} run now)")
    return BenchmarkOutcome(name=name, rows=rows, ran=ran,
                            results_csv=write_csv(rows, folder / "results.csv"),
                            plot=plot_summary(rows, folder / "summary.png"))
