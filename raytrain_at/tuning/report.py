"""A study's results: the printed table, ``results.csv`` and ``study.png``.

The plot has one bar per trial (its last value of the space's metric; faded and marked where ASHA
stopped it, with the epoch it reached) and, when trials were evaluated with AutoAttack, their
clean and robust accuracy per threat model side by side: how designs chosen for l_inf robustness
fare in l_2 and l_1.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.markup import escape
from rich.table import Table

from raytrain_at.runtime.console import make_console
from raytrain_at.evaluation.intervals import accuracy_interval, interval_text
from raytrain_at.evaluation.threats import NORMS
from raytrain_at.tuning.spaces import SearchSpace

TrialStatus = Literal["completed", "stopped early", "errored"]

# Reported training metrics shown for every trial (when the loop reported them).
TRAINING_COLUMNS = ("heldout_clean_accuracy", "heldout_robust_accuracy", "train_loss")
EVALUATION_COLUMNS = ("clean_acc", *(f"robust_acc_{norm}" for norm in NORMS))


def shown_value(value: object) -> str:
    """A sampled value as a table cell: ``table7:2``, ``0.001``, ``true``, ``[0.9, 0.95]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown_value(v) for v in value) + "]"
    return str(value)


@dataclass
class TrialRecord:
    """One trial's outcome, as the table, the CSV and the plot show it."""

    trial_id: str
    sample: dict[str, Any]
    metrics: dict[str, float]
    epochs: int
    status: TrialStatus
    run_id: str | None = None
    error: str | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # clean / robust per threat
    evaluation_path: str | None = None
    evaluation_n: int | None = None  # images the evaluation attacked


def trial_label(record: TrialRecord) -> str:
    """The sampled values, short: ``table7:2`` or ``optim.lr=0.001, aug.preset=basic``."""
    values = [shown_value(v) for v in record.sample.values()]
    if len(values) == 1:
        return values[0]
    return ", ".join(f"{key}={value}" for key, value in zip(record.sample, values))


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def results_rows(records: list[TrialRecord], space: SearchSpace) -> list[dict[str, str]]:
    """One row per trial: id, searched values, status, epochs, metrics, evaluation, run."""
    rows = []
    for record in records:
        row = {"trial_id": record.trial_id}
        row.update({key: shown_value(value) for key, value in record.sample.items()})
        row.update({"status": record.status, "epochs": str(record.epochs)})
        for column in dict.fromkeys((space.metric, *TRAINING_COLUMNS)):
            row[column] = _cell(record.metrics.get(column))
        for column in EVALUATION_COLUMNS:
            row[f"autoattack_{column}"] = _cell(record.evaluation.get(column))
        row["mlflow_run_id"] = record.run_id or ""
        row["error"] = record.error or ""
        rows.append(row)
    return rows


def print_table(records: list[TrialRecord], space: SearchSpace, title: str) -> None:
    """The results as a rich table, best first by the metric (errored trials last)."""
    def order(record: TrialRecord) -> tuple[int, float]:
        value = record.metrics.get(space.metric)
        if value is None:
            return (1, 0.0)
        return (0, -value if space.mode == "max" else value)

    # The CSV has every column; the terminal gets the ones that rank and explain the trials.
    headers = {"trial_id": "trial", **{key: key for key in space.search}, "status": "status",
               "epochs": "epochs", "heldout_clean_accuracy": "held-out clean",
               "heldout_robust_accuracy": "held-out robust",
               **{f"autoattack_{c}": "AA " + c.replace("robust_acc_", "").replace("_acc", "")
                  for c in EVALUATION_COLUMNS},
               "mlflow_run_id": "MLflow run"}
    if space.metric not in headers:
        headers[space.metric] = space.metric
    ordered = sorted(records, key=order)
    rows = results_rows(ordered, space)
    shown = [c for c in headers if any(row.get(c) for row in rows)]
    table = Table(title=title)
    for column in shown:
        table.add_column(headers[column], no_wrap=True,
                         # an interval ("[28.0, 72.0]") is never cut
                         min_width=12 if column.startswith("autoattack_") else None,
                         justify="left" if column in ("trial_id", "status", "mlflow_run_id",
                                                      *space.search) else "right")
    for record, row in zip(ordered, rows):
        # AutoAttack of a few images says little: each accuracy (percent) with its 95 %
        # interval on the line below.
        for column in EVALUATION_COLUMNS:
            value = record.evaluation.get(column)
            if value is not None and record.evaluation_n:
                row[f"autoattack_{column}"] = f"{100 * value:.1f}\n" + interval_text(
                    accuracy_interval(value, record.evaluation_n))
        table.add_row(*(row[c][:8] if c == "mlflow_run_id" else row[c] for c in shown))
    if any(r.evaluation_n for r in records):
        table.caption = escape("AA: AutoAttack of the best trials (percent); [low, high]: 95 % "
                               "Wilson interval over the images attacked")
    make_console().print(table)


def write_csv(records: list[TrialRecord], space: SearchSpace, path: Path) -> Path:
    rows = results_rows(records, space)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_study(records: list[TrialRecord], space: SearchSpace, path: Path) -> Path:
    """Bars of the metric per trial; AutoAttack per threat of the evaluated trials beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in records if r.evaluation]
    columns = 2 if evaluated else 1
    fig, axes = plt.subplots(1, columns, figsize=(6.5 * columns, 4.2), squeeze=False)
    ax = axes[0][0]
    labels = [f"{trial_label(r)}\n{r.trial_id}" for r in records]
    values = [r.metrics.get(space.metric, 0.0) for r in records]
    colours = {"completed": "#2b6cb0", "stopped early": "#a0aec0", "errored": "#e53e3e"}
    bars = ax.bar(range(len(records)), values, color=[colours[r.status] for r in records])
    for bar, record in zip(bars, records):
        note = {"completed": f"{record.epochs} ep", "stopped early": f"stopped @{record.epochs}",
                "errored": "error"}[record.status]
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(records)), labels, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel(space.metric.replace("_", " "))
    ax.set_title(f"{space.name}: last reported value per trial", fontsize=10)
    ax.set_ylim(0, max([1.0, *values]) * 1.1)
    if evaluated:
        ax = axes[0][1]
        keys = [k for k in EVALUATION_COLUMNS if any(k in r.evaluation for r in evaluated)]
        width = 0.8 / len(keys)
        for index, key in enumerate(keys):
            ax.bar([i + index * width for i in range(len(evaluated))],
                   [r.evaluation.get(key, 0.0) for r in evaluated], width,
                   label=key.replace("robust_acc_", "robust ").replace("_acc", ""))
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(evaluated))],
                      [f"{trial_label(r)}\n{r.trial_id}" for r in evaluated], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (AutoAttack)")
        ax.set_title("best trials: clean and robust accuracy per threat", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(records: list[TrialRecord], space: SearchSpace, folder: Path, *,
                 quiet: bool = False) -> tuple[Path, Path]:
    """Print the table (unless ``quiet``) and write ``results.csv`` and ``study.png``."""
    if not quiet:
        print_table(records, space, f"{space.name}: {len(records)} trials, metric "
                                    f"{space.metric} ({space.mode})")
    return (write_csv(records, space, folder / "results.csv"),
            plot_study(records, space, folder / "study.png"))
