"""A study's results beside the paper's table: the printed table, ``paper_comparison.csv`` and
``paper_comparison.png``.

One row per row of the space's paper table (its label, the trial that ran it, how far it got),
with our AutoAttack clean and robust accuracy per threat model next to the published number and
the difference; trials of the grid that the table does not list (``--fast`` runs the whole grid)
follow with empty paper columns. Accuracies are in percent, as the paper prints them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from raytrain_at.runtime.console import make_console
from raytrain_at.evaluation.threats import NORMS
from raytrain_at.tuning.report import TrialRecord, trial_label
from raytrain_at.tuning.spaces import PaperRow, SearchSpace

# The compared measurements, as EvaluationResult.metrics() names them, and their titles.
MEASURES: dict[str, str] = {"clean_acc": "clean",
                            **{f"robust_acc_{norm}": norm for norm in NORMS}}


@dataclass(frozen=True)
class PaperComparison:
    """The written comparison: its CSV, its plot and its columns (for MLflow's table)."""

    csv: Path
    plot: Path
    columns: dict[str, list[str]]


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _match(records: list[TrialRecord], space: SearchSpace
           ) -> list[tuple[PaperRow | None, TrialRecord | None]]:
    """(paper row, its trial) pairs in the table's order, then trials no row lists."""
    paper = space.paper
    rows = paper.rows if paper is not None else []
    keyed = {json.dumps(record.sample, sort_keys=True): record for record in records}
    pairs: list[tuple[PaperRow | None, TrialRecord | None]] = [
        (row, keyed.pop(json.dumps(row.point, sort_keys=True), None)) for row in rows]
    pairs += [(None, record) for record in keyed.values()]
    return pairs


def comparison_rows(records: list[TrialRecord], space: SearchSpace) -> list[dict[str, str]]:
    """One dict per row: ``row``, ``trial``, ``point``, ``status``, ``epochs``, ``flops``, then
    ``ours_<measure>``, ``paper_<measure>`` and ``diff_<measure>`` (percentage points)."""
    out = []
    for row, record in _match(records, space):
        published = row.published() if row is not None else {}
        cells = {"row": row.label if row is not None else "(not in the table)",
                 "trial": record.trial_id if record is not None else "",
                 "point": trial_label(record) if record is not None else
                 (", ".join(f"{k}={v}" for k, v in row.point.items()) if row else ""),
                 "status": record.status if record is not None else "not run",
                 "epochs": str(record.epochs) if record is not None else "",
                 "flops": "" if row is None or row.flops is None else f"{row.flops:g}"}
        for measure in MEASURES:
            ours = record.evaluation.get(measure) if record is not None else None
            paper = published.get(measure)
            cells[f"ours_{measure}"] = _percent(ours)
            cells[f"paper_{measure}"] = _percent(paper)
            cells[f"diff_{measure}"] = ("" if ours is None or paper is None
                                        else f"{100 * (ours - paper):+.1f}")
        out.append(cells)
    return out


def print_comparison(rows: list[dict[str, str]], space: SearchSpace) -> None:
    """The comparison as a rich table: ``ours / paper`` per measurement."""
    table_name = space.paper.table if space.paper is not None else space.name
    spec = space.evaluation
    table = Table(title=f"{table_name}: ours / paper, percent (AutoAttack {spec.version}, "
                        f"n={'all' if spec.n is None else spec.n}; {space.study_mode} mode)")
    for column in ("row", "trial", "status", "epochs", *MEASURES.values()):
        table.add_column(column, justify="left" if column in ("row", "trial", "status")
                         else "right", no_wrap=column != "row")
    for row in rows:
        table.add_row(row["row"], row["trial"], row["status"], row["epochs"],
                      *(f"{row[f'ours_{m}'] or '-'} / {row[f'paper_{m}'] or '-'}"
                        for m in MEASURES))
    make_console().print(table)


def plot_comparison(rows: list[dict[str, str]], space: SearchSpace, path: Path) -> Path:
    """One panel per measurement: our bar beside the paper's for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 4.4),
                             squeeze=False)
    labels = [row["row"] for row in rows]
    positions = range(len(rows))
    for ax, (measure, title) in zip(axes[0], MEASURES.items()):
        ours = [float(row[f"ours_{measure}"] or 0.0) for row in rows]
        paper = [float(row[f"paper_{measure}"] or 0.0) for row in rows]
        ax.bar([i - 0.2 for i in positions], ours, 0.4, label="ours", color="#2b6cb0")
        ax.bar([i + 0.2 for i in positions], paper, 0.4, label="paper", color="#a0aec0")
        ax.set_xticks(list(positions), labels, fontsize=7, rotation=35, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=8)
    table_name = space.paper.table if space.paper is not None else space.name
    fig.suptitle(f"{space.name}: {table_name}, ours (AutoAttack {space.evaluation.version}) "
                 "vs paper", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_paper_comparison(records: list[TrialRecord], space: SearchSpace, folder: Path, *,
                           quiet: bool = False) -> PaperComparison:
    """Print the comparison (unless ``quiet``) and write its CSV and plot into ``folder``."""
    rows = comparison_rows(records, space)
    if not quiet:
        print_comparison(rows, space)
    path = folder / "paper_comparison.csv"
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    return PaperComparison(csv=path, plot=plot_comparison(rows, space,
                                                          folder / "paper_comparison.png"),
                           columns=columns)
