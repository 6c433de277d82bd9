"""Report cards: what the registry's pages say about a version and a registered model.

MLflow's UI renders a model version's and a registered model's description as Markdown (GitHub
flavour: tables, links, images) at the top of the page. A version's description is its report
card: clean and l_inf / l_2 / l_1 robust accuracy with n, radius, side, attack version, the
guards' verdict and 95 % Wilson intervals; the paper's row beside ours; the recipe; the lineage
(clean pre-training run -> adversarial run -> evaluation) with the selected epoch and what selected
it; links to the runs, the result JSON and the plots. A registered model's description names the
champion of each norm above a table of its versions.

Everything here is text built from plain values (no MLflow calls), so it is tested without a
store. Links are the UI's own routes (``#/experiments/...``) and the server's artifact route
(``model-versions/get-artifact``), relative to the UI's page, so they work under ``mlflow ui``,
``mlflow server`` and a ``--static-prefix``.

MLflow stores a description in a column of 5,000 characters: every card is kept within
:data:`MAX_DESCRIPTION` by dropping its least important parts first.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytrain_at.evaluation.intervals import interval_text
from raytrain_at.evaluation.result import EvaluationResult
from raytrain_at.registry.leaderboard_formats import (ACCURACIES, NORMS, TITLES, accuracy_cell,
                                                      compact_markdown, radius_text,
                                                      records)
from raytrain_at.registry.paper_rows import (PAPER_SETTING, PaperRow, paper_rows,
                                             paper_setting_differences, reference_rows)

MAX_DESCRIPTION = 5000
ATTACKS = {"standard": "APGD-CE, APGD-T, FAB-T, Square", "fast": "APGD-CE, APGD-T",
           "apgdt": "APGD-T, 40 iterations, 3 targets", "plus": "AutoAttack+"}


@dataclass(frozen=True)
class RunRef:
    """An MLflow run a card links to."""

    run_id: str
    experiment_id: str
    name: str

    @property
    def url(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def link(self) -> str:
        return f"[run {_md(self.name)}]({self.url})"


@dataclass
class Lineage:
    """Where a version's weights come from.

    ``init`` / ``pretrained``: the training config's ``model.init`` and ``model.pretrained`` as
    recorded; ``init_run``: the run ``init`` resolved to (with ``init_is_clean`` when that run
    trained without an attack: a clean pre-training); ``training``: the run that trained these
    weights (None for a model file from elsewhere, which gets a register run of its own).
    """

    init: str | None = None
    pretrained: str | None = None
    # The training run a local ``init`` file records (read from the file by ``register``).
    init_source_run: str | None = None
    init_run: RunRef | None = None
    init_is_clean: bool = False
    training: RunRef | None = None
    register_run: RunRef | None = None
    selected_epoch: str | None = None
    epochs: str | None = None
    selected_by: str | None = None
    # Whether the model file has a training record at all (else its start is unknown).
    recorded: bool = True


@dataclass
class VersionCard:
    """What a version's report card is made of (see :func:`version_card`)."""

    name: str
    version: str
    model_id: str
    experiment_id: str
    params: dict[str, Any]
    result: EvaluationResult | None
    lineage: Lineage
    # Files of the version's artifacts, by what they are (``result``, ``guards``, ``eps sweep``,
    # ``resolution sweep``): names inside the version's artifact folder.
    files: dict[str, str] = field(default_factory=dict)
    recipe_changes: list[str] | None = None
    forced: bool = False


def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell or link label."""
    return str(text).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def artifact_url(name: str, version: str, path: str) -> str:
    """The server's download route for a file of a version's artifacts."""
    query = urllib.parse.urlencode({"name": name, "version": version, "path": path})
    return f"model-versions/get-artifact?{query}"


def version_url(name: str, version: str | int) -> str:
    return f"#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _count(value: float, n: int) -> str:
    return f"{round(value * n)}/{n}"


def guards_verdict(result: EvaluationResult, forced: bool = False) -> str:
    failed = [g.name for g in result.guards if not g.passed]
    if not failed:
        return f"all {len(result.guards)} guards passed"
    text = f"**UNTRUSTWORTHY**: failed {', '.join(failed)}"
    return text + (" (registered with --force; no champion alias)" if forced else "")


def _paper(card: VersionCard) -> tuple[list[PaperRow], bool]:
    """The paper's rows beside this version, and whether its recipe reproduces them."""
    try:
        params_m = float(card.params.get("params_m") or "nan")
    except ValueError:
        params_m = float("nan")
    return reference_rows(card.params.get("recipe"), params_m if params_m == params_m else None)


def _accuracy_table(card: VersionCard, result: EvaluationResult) -> list[str]:
    rows, _ = _paper(card)
    n = result.data.n
    header = "| | ours | 95 % CI (Wilson) | radius |" + "".join(
        f" paper, {_md(r.table)} |" for r in rows)
    lines = [header, "|---|---:|---:|---:|" + "---:|" * len(rows)]
    paper = [f" {r.clean:.2f} |" if r.clean is not None else " - |" for r in rows]
    lines.append(f"| clean | {_pct(result.clean_accuracy)} ({_count(result.clean_accuracy, n)})"
                 f" | {interval_text(result.clean_interval)} | - |" + "".join(paper))
    for norm in NORMS:
        threat = result.threats.get(norm)
        if threat is None:
            continue
        paper = []
        for r in rows:
            value = r.accuracy(norm)
            paper.append(" - |" if value is None else f" {value:.2f} |")
        lines.append(f"| {TITLES[norm]} | {_pct(threat.robust_accuracy)} "
                     f"({_count(threat.robust_accuracy, threat.n)}) | "
                     f"{interval_text(threat.robust_interval)} | "
                     f"{radius_text(norm, threat.eps)} |" + "".join(paper))
    return lines


def _evaluation_lines(card: VersionCard, result: EvaluationResult) -> list[str]:
    data = Path(result.data.path).name
    norms = ", ".join(TITLES[n] for n in result.threats)
    lines = [f"**Robust accuracy** ({norms}): AutoAttack {result.version} "
             f"({ATTACKS.get(result.version, result.version)}) on **n = {result.data.n}** images "
             f"of `{data}` at {result.data.resolution} px, seed {result.seed}, {result.kernels} "
             f"kernels; {guards_verdict(result, card.forced)}.", ""]
    lines += _accuracy_table(card, result)
    lines.append("")
    rows, reproduced = _paper(card)
    recipe = card.params.get("recipe")
    if rows and reproduced:
        lines.append("**Paper row** reproduced by recipe " + f"`{recipe}`: " + "; ".join(
            f"{_md(r.table)}, {_md(r.row)}" for r in rows) + ".")
    elif rows:
        why = f"recipe `{recipe}` is no row of the paper" if recipe else "no recipe recorded"
        lines.append(f"**Paper row**: none ({why}); for reference, its size class's most "
                     f"robust model, {_md(rows[0].table)}, {_md(rows[0].row)}.")
    if rows:
        differences = paper_setting_differences(
            {norm: t.eps for norm, t in result.threats.items()}, result.data.n,
            result.data.resolution, data)
        lines.append("\nThe paper measures " + PAPER_SETTING + (
            "." if not differences else
            f"; **not comparable** with ours: {'; '.join(differences)}."))
    if result.eps_sweep is not None:
        sweep = result.eps_sweep
        points = ", ".join(f"{radius_text(sweep.norm, p.eps)}: {100 * p.robust_accuracy:.1f}"
                           for p in sweep.points)
        lines.append(f"\n{TITLES[sweep.norm]} sweep ({sweep.version}): {points}; expected "
                     f"robustness {100 * sweep.expected_robustness:.1f} %.")
    if result.resolution_sweep is not None:
        res = result.resolution_sweep
        lines.append(f"\nResolution sweep ({res.version}): best at {res.best_resolution} px of "
                     + ", ".join(str(p.resolution) for p in res.points) + ".")
    if result.corruptions is not None:
        lines.append(f"\nCorruptions ({result.corruptions.protocol}): "
                     f"{100 * result.corruptions.accuracy:.1f} %.")
    return lines


def _model_line(params: dict[str, Any]) -> str:
    stem = params.get("stem") or "default"
    text = (f"**Model** `{params.get('architecture')}` (stem {_md(stem)}), "
            f"{params.get('params_m')} M parameters, {params.get('flops_g')} GFLOPs at "
            f"{params.get('trained_resolution')} px")
    if params.get("normalisation"):
        text += f", normalisation {_md(params['normalisation'])} inside"
    if params.get("epochs"):
        eps, norm = params.get("train_eps"), params.get("train_norm")
        if _adversarial(params) and norm in TITLES:
            text += (f"; trained {params['epochs']} epochs ({params.get('train_objective')}) "
                     f"against {params.get('attack_steps')}-step {TITLES[norm]} attacks at "
                     f"{radius_text(norm, float(eps)) if eps else '?'}")
        else:
            text += f"; trained {params['epochs']} epochs without an attack"
    return text + "."


def _adversarial(params: dict[str, Any]) -> bool:
    """Whether the training record says the weights were trained against an attack."""
    return bool(params.get("attack_steps")) and params.get("train_objective") != "clean"


def _recipe_line(card: VersionCard) -> str:
    recipe = card.params.get("recipe")
    if not recipe:
        return "**Recipe**: none recorded (the model file has no training record)."
    rows = paper_rows(recipe)
    text = f"**Recipe** `{recipe}`"
    if rows:
        text += " reproduces " + "; ".join(f"{_md(r.table)}, {_md(r.row)}" for r in rows)
    else:
        text += " (no row of the paper)"
    if card.recipe_changes:
        shown = card.recipe_changes[:8]
        more = len(card.recipe_changes) - len(shown)
        text += (f"; **changed** {len(card.recipe_changes)} key(s): "
                 + ", ".join(f"`{_md(c)}`" for c in shown) + (f" and {more} more" if more else ""))
    elif card.recipe_changes is not None:
        text += ", unchanged"
    return text + "."


def _lineage_lines(card: VersionCard) -> list[str]:
    lin = card.lineage
    if lin.init_run is not None:
        what = "clean pre-training" if lin.init_is_clean else "initial weights"
        start = f"{what}: {lin.init_run.link()} (`model.init` {_md(lin.init)})"
    elif lin.init:
        start = f"initial weights: `{_md(lin.init)}` (no run of this store)"
    elif lin.pretrained:
        start = f"clean pre-trained weights `{_md(lin.pretrained)}` (non-stem parameters)"
    elif not lin.recorded:
        start = "initial weights: unknown (the model file has no training record)"
    else:
        start = "clean pre-training: none (random initialisation)"
    if lin.init and lin.pretrained and lin.init_run is not None:
        start += f", non-stem weights first from `{_md(lin.pretrained)}`"
    if lin.training is not None:
        kind = ("adversarial training" if _adversarial(card.params) else
                "clean training" if card.params.get("epochs") else "training")
        train = f"{kind}: {lin.training.link()}"
    else:
        train = "training: not in this store (model file from elsewhere)"
        if lin.register_run is not None:
            train += f"; registered by {lin.register_run.link()}"
    if lin.selected_epoch:
        train += f", selected epoch **{lin.selected_epoch}**" + (
            f" of {lin.epochs}" if lin.epochs else "")
        if lin.selected_by:
            train += f" ({_md(lin.selected_by)})"
    result = card.result
    if result is None:
        evaluation = "evaluation: none (registered unevaluated)"
    else:
        name = card.files.get("result")
        label = f"[{_md(name)}]({artifact_url(card.name, card.version, name)})" if name else \
            "result JSON"
        evaluation = (f"evaluation: {label}, {result.created}, {result.wall_seconds:.0f} s, "
                      f"code {result.code_version}")
    return ["**Lineage**", "", f"1. {start}", f"2. {train}", f"3. {evaluation}"]


def _files_line(card: VersionCard) -> str:
    links = [f"[{_md(label)}]({artifact_url(card.name, card.version, path)})"
             for label, path in card.files.items()]
    links.append(f"[logged model](#/experiments/{card.experiment_id}/models/{card.model_id})")
    return "**Files** " + " · ".join(links)


def _plots(card: VersionCard) -> list[str]:
    return [f"![{label}]({artifact_url(card.name, card.version, path)})"
            for label, path in card.files.items() if path.endswith(".png")]


def summary_line(result: EvaluationResult | None) -> str:
    """The card's first line, plain text: what the versions table's description column shows
    (``clean 93.8 %, l_inf 25.0 %, ... on n=16, AutoAttack apgdt, guards passed``)."""
    if result is None:
        return "Not evaluated (registered with --unevaluated)."
    parts = [f"clean {_pct(result.clean_accuracy)}"] + [
        f"{TITLES[norm]} {_pct(result.threats[norm].robust_accuracy)}"
        for norm in NORMS if norm in result.threats]
    verdict = "guards passed" if result.trustworthy else "UNTRUSTWORTHY"
    return (f"{', '.join(parts)} on n={result.data.n} (AutoAttack {result.version}, "
            f"{verdict})")


def version_card(card: VersionCard) -> str:
    """The Markdown report card of a version, at most :data:`MAX_DESCRIPTION` characters."""
    head = [summary_line(card.result), ""]
    if card.result is None:
        head += ["**Not evaluated**: registered with --unevaluated, so no robust accuracy and "
                 "no champion alias.", ""]
    else:
        head += _evaluation_lines(card, card.result) + [""]
    body = [_recipe_line(card), "", _model_line(card.params), ""] + _lineage_lines(card) + [""]
    parts = [head, body, [_files_line(card)], [""] + _plots(card)]
    # Drop the least important parts until the card fits the description column.
    while len(text := "\n".join(line for part in parts for line in part)) > MAX_DESCRIPTION:
        if len(parts) > 3:
            parts.pop()
        elif card.recipe_changes and len(card.recipe_changes) > 1:
            card.recipe_changes = card.recipe_changes[:1]
            parts[1] = [_recipe_line(card), "", _model_line(card.params), ""] + \
                _lineage_lines(card) + [""]
        else:
            return text[:MAX_DESCRIPTION - 1] + "…"
    return text


REEVALUATED = "**Re-evaluated**"


def with_reevaluation(description: str, name: str, version: str, summary: str,
                      when: str) -> str:
    """An earlier version's card with a line (after its summary) pointing to the version that
    registered the same weights again with another evaluation; an older such line goes."""
    lines = [line for line in (description or "").split("\n")
             if not line.startswith(REEVALUATED)]
    note = (f"{REEVALUATED} {when}: the same weights were registered again as "
            f"[v{version}]({version_url(name, version)}) with a new evaluation: {_md(summary)}.")
    at = 2 if len(lines) > 1 else len(lines)
    text = "\n".join(lines[:at] + [note, ""] + lines[at:])
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION - 1] + "…"


# ---------------------------------------------------------------------------- registered model
def _champion_rows(name: str, items: list[dict[str, Any]]) -> list[str]:
    lines = ["| norm | champion | robust accuracy [95 % CI] | clean | radius | data | n | side |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for norm in NORMS:
        holder = next((r for r in items if f"champion-{norm}" in r["aliases"]), None)
        if holder is None:
            lines.append(f"| {TITLES[norm]} | none yet | - | - | - | - | - | - |")
            continue
        key = f"robust_acc_{norm}"
        lines.append(
            f"| {TITLES[norm]} | [v{holder['version']}]({version_url(name, holder['version'])})"
            f" | {accuracy_cell(holder, key)} | {accuracy_cell(holder, 'clean_acc')} | "
            f"{radius_text(norm, holder[f'eps_{norm}'])} | {_md(holder['data'] or '-')} | "
            f"{holder['n'] or '-'} | {holder['resolution'] or '-'} |")
    return lines


def _version_row(name: str, r: dict[str, Any], row: dict[str, Any]) -> str:
    tags = row.get("tags", {})
    guards = {"true": "passed", "false": "**failed**"}.get(tags.get("trustworthy", ""),
                                                           "not evaluated")
    aliases = ", ".join(a for a in r["aliases"]) or "-"
    recipe = row["params"].get("recipe") or "-"
    return (f"| [v{r['version']}]({version_url(name, r['version'])}) | "
            f"{_md(r['architecture'] or '?')} | `{_md(recipe)}` | "
            + " | ".join(accuracy_cell(r, key) for key in ACCURACIES)
            + f" | {r['n'] or '-'} | {guards} | {_md(aliases)} |")


@dataclass(frozen=True)
class HistoryLink:
    """A registered model's alias moves (oldest first) and where the whole file is."""

    lines: list[str]
    artifact_url: str | None = None


def model_card(name: str, rows: list[dict[str, Any]], overview: str | None = None,
               history: HistoryLink | None = None, latest_moves: int = 3) -> str:
    """The registered model's description: champions per norm, the latest alias moves, then
    its versions (newest first, as many as fit) and where the overall leaderboard is."""
    items = records(rows)
    by_version = {row["version"]: row for row in rows}
    head = [f"### {_md(name)}: robust classifiers (raytrain-at)", "",
            "**Champions**: each norm's best trustworthy robust accuracy, compared only at one "
            "radius on one data set; [low, high] is the 95 % Wilson interval over n images.", ""]
    head += _champion_rows(name, items)
    if history is not None and history.lines:
        whole = (f" ([all {len(history.lines)}]({history.artifact_url}))"
                 if history.artifact_url else "")
        head += ["", f"**Latest alias moves**{whole}:", ""] + [
            f"- {_md(line)}" for line in reversed(history.lines[-latest_moves:])]
    foot = [""]
    if overview:
        foot.append(f"All registered models as the paper's Table 2: [{_md(overview)}]"
                    f"(#/models/{urllib.parse.quote(overview, safe='')}).")
    table = ["", "**Versions** (newest first)", "",
             "| version | architecture | recipe | clean | l_inf | l_2 | l_1 | n | guards | "
             "aliases |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    budget = MAX_DESCRIPTION - len("\n".join(head + foot)) - len("\n".join(table)) - 80
    newest = sorted(items, key=lambda r: -r["version"])
    shown = []
    for r in newest:
        line = _version_row(name, r, by_version[r["version"]])
        if budget - len(line) - 1 < 0:
            break
        budget -= len(line) + 1
        shown.append(line)
    if len(shown) < len(newest):
        shown.append(f"\n{len(newest) - len(shown)} older versions: `raytrain-at leaderboard "
                     f"--name {name}`.")
    return "\n".join(head + table + shown + foot)


def leaderboard_card(rows: list[dict[str, Any]], title: str) -> str:
    """The overview model's description: the leaderboard as Markdown (Table 2's layout) of
    ``rows`` (best first), as many rows as fit."""
    items = records(rows)
    head = [f"### {title}", "",
            "Every registered version, grouped by size as in the paper's Table 2 and sorted by "
            "l_inf robust accuracy; [low, high] is the 95 % Wilson interval over n images. "
            "Refreshed at every registration; `raytrain-at leaderboard --format html` writes it "
            "as a page.", ""]
    shown = len(items)
    while True:
        table = compact_markdown(items[:shown], lambda r: version_url(r["model"], r["version"]))
        tail = [] if shown == len(items) else [
            "", f"{len(items) - shown} more: `raytrain-at leaderboard`."]
        text = "\n".join(head + [table] + tail)
        if len(text) <= MAX_DESCRIPTION or shown == 0:
            return text[:MAX_DESCRIPTION]
        shown -= 1
