"""The leaderboard for people and for scripts: one record per registered version, rendered as a
rich table, Markdown, HTML, CSV or JSON.

A robust accuracy means nothing without its radius, data and sample size ("87.5" at 8/255 on 16
digits is not an ImageNet figure), so every format carries them beside the accuracies, and each
accuracy its 95 % Wilson interval over those n images. Markdown and HTML follow the paper's
Table 2: grouped by size (small < 30M, medium 30-80M, large >= 80M parameters).
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from raytrain_at.errors import UserError
from raytrain_at.evaluation.intervals import accuracy_interval, interval_text
from raytrain_at.evaluation.threats import NORMS

FORMATS = ("table", "markdown", "html", "csv", "json")
TITLES = {"linf": "l_inf", "l2": "l_2", "l1": "l_1"}
# Size classes of the paper's Table 2, by parameters (M).
SIZES = {"small": (0.0, 30.0), "medium": (30.0, 80.0), "large": (80.0, float("inf"))}
ACCURACIES = ["clean_acc", *[f"robust_acc_{norm}" for norm in NORMS]]
FIELDS = ["model", "version", "size", "architecture", "stem", "params_m", "flops_g", "epochs",
          "attack_steps", "data", "n", "resolution", "clean_acc", "clean_acc_ci95_low",
          "clean_acc_ci95_high",
          *[key for norm in NORMS for key in (
              f"eps_{norm}", f"robust_acc_{norm}", f"robust_acc_{norm}_ci95_low",
              f"robust_acc_{norm}_ci95_high")], "aliases"]


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


def size_class(params_m: float | None) -> str | None:
    """``small`` / ``medium`` / ``large`` as in the paper's Table 2; None if unknown."""
    if params_m is None:
        return None
    return next(name for name, (low, high) in SIZES.items() if low <= params_m < high)


def records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat, typed records of leaderboard rows (fractions as numbers; None where unknown), each
    accuracy with its 95 % Wilson interval over the ``n`` images evaluated."""
    out = []
    for row in rows:
        p, m = row["params"], row["metrics"]
        record: dict[str, Any] = {
            "model": row["name"], "version": row["version"],
            "size": size_class(_number(p.get("params_m"))),
            "architecture": p.get("architecture"), "stem": p.get("stem"),
            "params_m": _number(p.get("params_m")), "flops_g": _number(p.get("flops_g")),
            "epochs": _number(p.get("epochs")), "attack_steps": _number(p.get("attack_steps")),
            "data": Path(p["eval_data"]).name if p.get("eval_data") else None,
            "n": _number(p.get("eval_n")), "resolution": _number(p.get("eval_resolution")),
            "clean_acc": m.get("clean_acc")}
        for norm in NORMS:
            record[f"eps_{norm}"] = _number(p.get(f"eps_{norm}"))
            record[f"robust_acc_{norm}"] = m.get(f"robust_acc_{norm}")
        record["aliases"] = sorted(row["aliases"])
        for key in ("epochs", "attack_steps", "n", "resolution"):
            if record[key] is not None:
                record[key] = int(record[key])
        for key in ACCURACIES:
            low, high = _interval(record[key], record["n"])
            record[f"{key}_ci95_low"], record[f"{key}_ci95_high"] = low, high
        out.append({field: record.get(field) for field in FIELDS})
    return out


def _interval(value: float | None, n: int | None) -> tuple[float | None, float | None]:
    if value is None or not n:
        return None, None
    return accuracy_interval(value, n)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def accuracy_cell(record: dict[str, Any], key: str, separator: str = " ") -> str:
    """``87.5 [52.9, 97.8]``: the accuracy in percent and its 95 % interval; ``-`` if none."""
    value = record[key]
    if value is None:
        return "-"
    low, high = record[f"{key}_ci95_low"], record[f"{key}_ci95_high"]
    if low is None or high is None:
        return _pct(value)
    return f"{_pct(value)}{separator}{interval_text((low, high))}"


def _aliases_text(aliases: list[str]) -> str:
    """``champion-linf, champion-l2`` -> ``champion: linf, l2`` (other aliases kept)."""
    champions = [a.removeprefix("champion-") for a in aliases if a.startswith("champion-")]
    others = sorted(a for a in aliases if not a.startswith("champion-"))
    parts = ([f"champion: {', '.join(sorted(champions, key=NORMS.index))}"]
             if champions else []) + others
    return "; ".join(parts)


TEXT_COLUMNS = ("size", "model", "architecture", "data", "aliases")


def text_rows(items: list[dict[str, Any]], separator: str = " ",
              with_size: bool = False) -> tuple[list[str], list[list[str]]]:
    """Column headers and cell texts, shared by the table, Markdown and HTML; ``separator``
    goes between an accuracy and its interval."""
    headers = ["model", "architecture", "params (M)", "FLOPs (G)", "epochs", "steps", "data",
               "n", "clean [95 % CI]"]
    for norm in NORMS:
        headers += [f"{TITLES[norm]} [95 % CI]", f"eps {TITLES[norm]}"]
    headers.append("aliases")
    cells = []
    for r in items:
        stem = r["stem"] or "default"
        line = [f"{r['model']} v{r['version']}",
                (r["architecture"] or "?") + ("" if stem == "default" else f" [{stem}]"),
                "?" if r["params_m"] is None else f"{r['params_m']:.2f}",
                "?" if r["flops_g"] is None else f"{r['flops_g']:.3f}",
                str(r["epochs"] or "-"), str(r["attack_steps"] or "-"), r["data"] or "-",
                str(r["n"] or "-"), accuracy_cell(r, "clean_acc", separator)]
        for norm in NORMS:
            line += [accuracy_cell(r, f"robust_acc_{norm}", separator),
                     radius_text(norm, r[f"eps_{norm}"])]
        line.append(_aliases_text(r["aliases"]))
        cells.append(([r["size"] or "?"] if with_size else []) + line)
    return (["size"] if with_size else []) + headers, cells


def rich_table(items: list[dict[str, Any]], title: str):
    """A rich table in the layout of the paper's Table 2, with radius, data and n; each
    interval on the line below its accuracy."""
    table = Table(title=title, caption=escape("[low, high]: 95 % Wilson interval over n images"))
    headers, cells = text_rows(items, separator="\n")
    for header in headers:
        table.add_column(header, justify="left" if header in TEXT_COLUMNS else "right")
    for line in cells:
        table.add_row(*line)
    return table


def by_size(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 2's order: small, medium, large (unknown size last), the given order kept inside
    each class."""
    order = [*SIZES, None]
    return sorted(items, key=lambda r: order.index(r["size"]))


def markdown(items: list[dict[str, Any]], link: Callable[[dict[str, Any]], str] | None = None
             ) -> str:
    """GitHub-flavoured Markdown in Table 2's layout (grouped by size); ``link`` turns a
    record into the URL its model cell links to (the registry's own copy)."""
    ordered = by_size(items)
    headers, cells = text_rows(ordered, with_size=True)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in headers) + "|"]
    for record, line in zip(ordered, cells):
        line = [c.replace("|", "\\|") for c in line]
        if link is not None:
            line[1] = f"[{line[1]}]({link(record)})"
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def compact_markdown(items: list[dict[str, Any]],
                     link: Callable[[dict[str, Any]], str]) -> str:
    """Table 2's layout in 12 columns, for a page as narrow as MLflow's description: the
    architecture beside the model, n beside the data, each radius inside its accuracy's cell
    (``87.5 [52.9, 97.8] at 8/255``)."""
    ordered = by_size(items)
    headers = ["size", "model", "params (M)", "FLOPs (G)", "epochs", "steps", "data, n",
               "clean [95 % CI]", *[f"{TITLES[norm]} [95 % CI] at radius" for norm in NORMS],
               "aliases"]
    lines = ["| " + " | ".join(headers) + " |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in ordered:
        stem = r["stem"] or "default"
        model = f"[{r['model']} v{r['version']}]({link(r)}) ({r['architecture'] or '?'}" + (
            "" if stem == "default" else f" [{stem}]") + ")"
        line = [r["size"] or "?", model,
                "?" if r["params_m"] is None else f"{r['params_m']:.2f}",
                "?" if r["flops_g"] is None else f"{r['flops_g']:.3f}",
                str(r["epochs"] or "-"), str(r["attack_steps"] or "-"),
                f"{r['data'] or '-'}, {r['n'] or '-'}", accuracy_cell(r, "clean_acc")]
        for norm in NORMS:
            cell = accuracy_cell(r, f"robust_acc_{norm}")
            line.append(cell if cell == "-" else f"{cell} at {radius_text(norm, r[f'eps_{norm}'])}")
        line.append(_aliases_text(r["aliases"]))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
    return "\n".join(lines)


def html_page(items: list[dict[str, Any]], title: str) -> str:
    """A standalone HTML page with the Markdown's table (Table 2's layout, escaped cells)."""
    ordered = by_size(items)
    headers, cells = text_rows(ordered, with_size=True)

    def row(tag: str, texts: list[str]) -> str:
        return "<tr>" + "".join(
            f"<{tag}{'' if h in TEXT_COLUMNS else ' class=num'}>{html.escape(t)}</{tag}>"
            for h, t in zip(headers, texts)) + "</tr>"

    body = "\n".join(row("td", line) for line in cells)
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}"
            "</title>\n<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}.num{text-align:right}</style>"
            f"</head><body>\n<table>\n<caption>{html.escape(title)}; [low, high]: 95 % Wilson "
            f"interval over n images</caption>\n<thead>{row('th', headers)}</thead>\n<tbody>\n"
            f"{body}\n</tbody>\n</table>\n</body></html>\n")


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
    if fmt == "html":
        return html_page(items, title)
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
