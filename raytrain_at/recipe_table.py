"""The bundled recipes as a table: what each trains and which row of the paper it reproduces.

The "reproduces" column is the recipe file's first comment line up to its colon (every recipe
opens with ``# Table N, model, setting: details``), so the table stays true to the files.
:func:`show_recipe` is one recipe on one screen (``raytrain-at recipes show NAME``).
"""

from __future__ import annotations

import yaml
from rich.table import Table

from raytrain_at.config import RunConfig, available_recipes, load_config, resolve_recipe
from raytrain_at.config_loader import RECIPES


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


def recipe_comments(name: str) -> list[str]:
    """The comment lines at the top of a recipe file (what it reproduces and why)."""
    lines = []
    for line in resolve_recipe(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def show_recipe(name: str, overrides: list[str] | None = None) -> str:
    """A recipe on one screen: its own comments, its base chain and the whole resolved config,
    one flow-style line (wrapped at 100 columns) per section. The text is YAML: the comments
    are comments, the config loads back as the recipe's resolved values.

    Raises:
        UserError: an unknown recipe or a bad override.
    """
    config = load_config(name, overrides)
    chain = " -> ".join(path.stem for path in RECIPES.chain(name))
    header = [*recipe_comments(name), f"# base chain: {chain}"]
    if overrides:
        header.append(f"# overrides: {' '.join(overrides)}")
    lines = []
    for key, value in config.model_dump(mode="json").items():
        if not isinstance(value, dict):
            lines.append(f"{key}: {_flow(value)}")
            continue
        # The section as one flow mapping, broken between entries only, at 100 columns.
        items = [f"{name}: {_flow(item)}" for name, item in value.items()]
        line = f"{key}: {{"
        for index, item in enumerate(items):
            text = item + ("}" if index == len(items) - 1 else ",")
            if len(line) + 1 + len(text) > 100 and not line.endswith("{"):
                lines.append(line)
                line = "  "
            line += ("" if line.endswith(("{", "  ")) else " ") + text
        lines.append(line)
    return "\n".join(header + lines) + "\n"


def _flow(value: object) -> str:
    """One value as YAML flow text (``null``, ``0.001``, ``[0.9, 0.95]``, ``'run:x/y'``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()
