"""The bundled recipes as a table: what each trains and which row of the paper it reproduces.

The "reproduces" column is the recipe file's first comment line up to its colon (every recipe
opens with ``# Table N, model, setting: details``), so the table stays true to the files.
"""

from __future__ import annotations

from rich.table import Table

from raytrain_at.config import RunConfig, available_recipes, load_config, resolve_recipe


def recipe_purpose(name: str) -> str:
    """The first comment line of a recipe file, up to its first colon."""
    for line in resolve_recipe(name).read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            head = text.split(": ", 1)[0]
            return head.rstrip(".,")
        if line.strip():
            break
    return ""


def attack_text(config: RunConfig) -> str:
    """``APGD-2 linf 4/255``, or ``none`` for clean training."""
    attack = config.attack
    if attack.kind == "none" or config.objective.kind == "clean":
        return "none (clean)"
    eps = attack.eps * 255
    radius = f"{eps:.0f}/255" if attack.norm == "linf" and abs(eps - round(eps)) < 1e-6 \
        else f"{attack.eps:g}"
    steps = "" if attack.kind == "fgsm" else f"-{attack.steps}"
    return f"{attack.kind.upper()}{steps} {attack.norm} {radius}"


def recipe_table() -> Table:
    """One row per bundled recipe (the ``_``-prefixed bases are left out)."""
    table = Table(title="Recipes (raytrain-at recipes show NAME; raytrain-at train NAME)")
    for column in ("name", "model", "epochs", "attack", "batch", "reproduces"):
        table.add_column(column, justify="right" if column in ("epochs", "batch") else "left",
                         no_wrap=column == "name")
    for name in available_recipes():
        config = load_config(name)
        table.add_row(name, config.model.name, str(config.schedule.epochs), attack_text(config),
                      str(config.schedule.global_batch_size), recipe_purpose(name))
    return table
