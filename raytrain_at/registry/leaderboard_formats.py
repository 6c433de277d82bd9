"""The leaderboard for people and for scripts: one record per registered version, rendered as a
rich table, Markdown, CSV or JSON.

A robust accuracy means nothing without its radius, data and sample size ("87.5" at 8/255 on 16
digits is not an ImageNet figure), so every format carries them beside the accuracies.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from raytrain_at.errors import UserError
from raytrain_at.evaluation.threats import NORMS

FORMATS = ("table", "markdown", "csv", "json")
THREATS = NORMS
TITLES = {"linf": "l_inf", "l2": "l_2", "l1": "l_1"}
FIELDS = ["model", "version", "architecture", "stem", "params_m", "flops_g", "epochs",
          "attack_steps", "data", "n", "resolution", "clean_acc",
          *[f"{kind}_{norm}" for norm in THREATS for kind in ("eps", "robust_acc")], "aliases"]


def _number(text: Any) -> float | None:
    try:
        return None if text in (None, "", "None") else float(text)
    except (TypeError, ValueError):
        return None


def radius_text(norm: str, eps: float | None) -> str:
    """``8/255`` for l_inf radii on the 1/255 grid, else the plain number; ``-`` if unknown."""
    if eps is None:
        return "-"
    # Radii are stored with 6 significant digits (4/255 -> 0.0156863).
    if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-4:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat, typed records of leaderboard rows (fractions as numbers; None where unknown)."""
    out = []
    for row in rows:
        p, m = row["params"], row["metrics"]
        record: dict[str, Any] = {
            "model": row["name"], "version": row["version"],
            "architecture": p.get("architecture"), "stem": p.get("stem"),
            "params_m": _number(p.get("params_m")), "flops_g": _number(p.get("flops_g")),
            "epochs": _number(p.get("epochs")), "attack_steps": _number(p.get("attack_steps")),
            "data": Path(p["eval_data"]).name if p.get("eval_data") else None,
            "n": _number(p.get("eval_n")), "resolution": _number(p.get("eval_resolution")),
            "clean_acc": m.get("clean_acc")}
        for norm in THREATS:
            record[f"eps_{norm}"] = _number(p.get(f"eps_{norm}"))
            record[f"robust_acc_{norm}"] = m.get(f"robust_acc_{norm}")
        record["aliases"] = sorted(row["aliases"])
        for key in ("epochs", "attack_steps", "n", "resolution"):
            if record[key] is not None:
                record[key] = int(record[key])
        out.append(record)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _aliases_text(aliases: list[str]) -> str:
    """``champion-linf, champion-l2`` -> ``champion: linf, l2`` (other aliases kept)."""
    champions = [a.removeprefix("champion-") for a in aliases if a.startswith("champion-")]
    others = sorted(a for a in aliases if not a.startswith("champion-"))
    parts = ([f"champion: {', '.join(sorted(champions, key=THREATS.index))}"]
             if champions else []) + others
    return "; ".join(parts)


def text_rows(items: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column headers and cell texts, shared by the table and Markdown."""
    headers = ["model", "architecture", "params (M)", "FLOPs (G)", "epochs", "steps", "data",
               "n", "clean"]
    for norm in THREATS:
        headers += [TITLES[norm], f"eps {TITLES[norm]}"]
    headers.append("aliases")
    cells = []
    for r in items:
        stem = r["stem"] or "default"
        line = [f"{r['model']} v{r['version']}",
                (r["architecture"] or "?") + ("" if stem == "default" else f" [{stem}]"),
                "?" if r["params_m"] is None else f"{r['params_m']:.2f}",
                "?" if r["flops_g"] is None else f"{r['flops_g']:.3f}",
                str(r["epochs"] or "-"), str(r["attack_steps"] or "-"), r["data"] or "-",
                str(r["n"] or "-"), _pct(r["clean_acc"])]
        for norm in THREATS:
            line += [_pct(r[f"robust_acc_{norm}"]), radius_text(norm, r[f"eps_{norm}"])]
        line.append(_aliases_text(r["aliases"]))
        cells.append(line)
    return headers, cells


def rich_table(items: list[dict[str, Any]], title: str):
    """A rich table in the layout of the paper's Table 2, with radius, data and n."""
    table = Table(title=title)
    headers, cells = text_rows(items)
    for header in headers:
        table.add_column(header, justify="left" if header in (
            "model", "architecture", "data", "aliases") else "right")
    for line in cells:
        table.add_row(*line)
    return table


def markdown(items: list[dict[str, Any]]) -> str:
    headers, cells = text_rows(items)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h in ("model", "architecture", "data", "aliases")
                            else "---:" for h in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    return "\n".join(lines)


def csv_text(items: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow({k: (";".join(v) if isinstance(v, list) else v) for k, v in item.items()})
    return buffer.getvalue()


def render(rows: list[dict[str, Any]], fmt: str, title: str) -> str | Any:
    """The leaderboard in ``fmt``: a rich table object for ``table``, text for the others."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    items = records(rows)
    if fmt == "table":
        return rich_table(items, title)
    if fmt == "markdown":
        return markdown(items)
    if fmt == "csv":
        return csv_text(items)
    return json.dumps(items, indent=1)


def print_table(table) -> None:
    """Print a rich table as wide as the terminal, or ``COLUMNS`` when set; when output is
    neither (a pipe, a file) as wide as the table needs, so no cell is cut."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        console = Console(width=int(columns))
    else:
        console = Console()
        if not console.is_terminal:
            wide = Console(width=10_000)
            need = Measurement.get(wide, wide.options, table).maximum
            console = Console(width=max(need, 80))
    console.print(table)
