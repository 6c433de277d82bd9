"""The benchmark's results: one row per configuration, aggregates, CSV and summary plots.

A row holds the configuration (backbone, family, pre-training, dataset, loss, protocol), the best
trial's searched hyperparameters, the five measurements (clean accuracy, AutoAttack robust
accuracy in l_inf / l_2 / l_1, common-corruption accuracy), and two aggregates over those five:
their sum and their geometric mean (which punishes a model that gives up one threat for the
others). Summary plots average the geometric mean by family, pre-training, loss and protocol.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from raytrain_at.runtime.console import make_console

# The five measurements, as EvaluationResult.metrics() names them.
MEASUREMENTS = ("clean_acc", "robust_acc_linf", "robust_acc_l2", "robust_acc_l1",
                "corruption_acc")
CONFIG_COLUMNS = ("configuration", "backbone", "family", "pretraining", "dataset", "loss",
                  "protocol")
GROUPINGS = ("family", "pretraining", "loss", "protocol")


def geometric_mean(values: list[float]) -> float:
    """Geometric mean of accuracies (0 when any is 0: failing one threat fails the aggregate)."""
    if not values or any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def aggregates(measured: dict[str, float]) -> dict[str, float]:
    """``sum`` and ``geometric_mean`` over the measurements present in ``measured``."""
    values = [measured[m] for m in MEASUREMENTS if m in measured]
    return {"sum": float(sum(values)), "geometric_mean": geometric_mean(values)}


def write_row(row: dict[str, Any], path: Path) -> Path:
    """Write one configuration's row atomically: a row file exists only when it is complete,
    which is what a resumed run checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(row, out, indent=1)
    os.replace(tmp, path)
    return path


def read_rows(folder: Path, order: list[str]) -> list[dict[str, Any]]:
    """The finished rows in configuration order (missing ones skipped)."""
    rows = []
    for key in order:
        path = folder / f"{key}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    hyper = sorted({k for row in rows for k in row if k.startswith("best.")})
    return [*CONFIG_COLUMNS, *MEASUREMENTS, "sum", "geometric_mean",
            "expected_robustness_linf", *hyper, "trials", "mlflow_run_id", "best_run_id"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = _columns(rows)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _text(row.get(c)) for c in columns})
    return path


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    shown = ["backbone", "dataset", "loss", "protocol", *MEASUREMENTS, "sum", "geometric_mean"]
    names = {"clean_acc": "clean", "robust_acc_linf": "l_inf", "robust_acc_l2": "l_2",
             "robust_acc_l1": "l_1", "corruption_acc": "corr.", "geometric_mean": "geo. mean"}
    for column in shown:
        table.add_column(names.get(column, column), no_wrap=True,
                         justify="left" if column in CONFIG_COLUMNS else "right")
    for row in rows:
        table.add_row(*(_text(row.get(c)) for c in shown))
    make_console().print(table)


def plot_summary(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean geometric-mean aggregate (and each configuration's value) per family, pre-training,
    loss and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GROUPINGS), figsize=(4.2 * len(GROUPINGS), 3.8),
                             squeeze=False)
    for ax, grouping in zip(axes[0], GROUPINGS):
        groups: dict[str, list[float]] = {}
        for row in rows:
            groups.setdefault(str(row[grouping]), []).append(row["geometric_mean"])
        names = list(groups)
        ax.bar(range(len(names)), [sum(v) / len(v) for v in groups.values()], color="#2b6cb0",
               alpha=0.8)
        for index, values in enumerate(groups.values()):
            ax.scatter([index] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"by {grouping}", fontsize=10)
        ax.set_ylim(0, 1.0)
    axes[0][0].set_ylabel("geometric mean of the 5 measurements")
    fig.suptitle("Robust fine-tuning benchmark: bars = mean, dots = configurations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
