"""The paper's published results per bundled recipe: the row a registered version reproduces.

Singh, Croce, Hein (2023), "Revisiting Adversarial Training for ImageNet": clean and AutoAttack
robust accuracy (percent) after l_inf adversarial training, evaluated on RobustBench's 5,000
ImageNet validation images at 224 px with l_inf 4/255, l_2 2 and l_1 75 (:data:`PAPER_SETTING`).
Table 1 prints one decimal, Table 2 two; a Table 2 recipe of 300 epochs is also Table 1's
"50 -> 300 epochs" row, and both rows are listed. Tables 11 and 12 add the attack-step and
PGD ablations (Table 11 gives l_inf only; its 1-step row's clean accuracy is from Sec. 5's text).

Keys are recipe names (``raytrain-at recipes``); a recipe that is no row of the paper (the
quickstart, transfer, fine-tuning and clean pre-training recipes) has none, and a version of such
a recipe is shown beside Table 2's most robust row of its size class instead, as a reference.
"""

from __future__ import annotations

from typing import NamedTuple, cast

from raytrain_at.evaluation.threats import PAPER_EPS, Norm
from raytrain_at.registry.leaderboard_formats import TITLES

PAPER_SETTING = ("AutoAttack (standard) on RobustBench's 5,000 ImageNet validation images at "
                 "224 px; l_inf 4/255, l_2 2, l_1 75")
# What a result must have been measured at to stand beside the paper's numbers.
PAPER_N = 5000
PAPER_RESOLUTION = 224


class PaperRow(NamedTuple):
    """One printed row: ``table`` (``"Table 2 (small)"``), its row label, and accuracies in
    percent as printed (None where the table has no entry)."""

    table: str
    row: str
    clean: float | None
    linf: float | None
    l2: float | None
    l1: float | None

    def accuracy(self, key: str) -> float | None:
        """``clean``, ``linf``, ``l2`` or ``l1``."""
        return getattr(self, key)


def _table1(arch: str, scheme: str, clean: float, linf: float, l2: float, l1: float) -> PaperRow:
    return PaperRow("Table 1", f"{arch}, {scheme}", clean, linf, l2, l1)


def _table2(size: str, arch: str, epochs: int, steps: int, clean: float, linf: float, l2: float,
            l1: float) -> PaperRow:
    return PaperRow(f"Table 2 ({size})", f"{arch}, ours, {epochs} epochs, {steps} steps", clean,
                    linf, l2, l1)


_RANDOM, _PRETRAINED = "random init., basic augment.", "+ strong clean pre-training"
_HEAVY, _LONGER = "+ heavy augmentations", "50 -> 300 epochs"

# Table 1, per architecture: random init, + clean pre-training, + heavy augmentation, 300 epochs.
_TABLE1: dict[str, tuple[str, tuple[tuple[float, float, float, float], ...]]] = {
    "convnext_tiny": ("ConvNeXt-T", ((64.0, 37.1, 28.9, 8.8), (69.4, 41.6, 42.4, 18.9),
                                     (71.0, 46.5, 38.1, 14.9), (72.4, 48.6, 38.0, 14.9))),
    "convnext_tiny_cvst": ("ConvNeXt-T + CvSt", (
        (64.2, 37.6, 40.2, 18.6), (69.1, 42.2, 42.4, 19.7), (69.1, 47.5, 47.8, 24.6),
        (72.7, 49.5, 48.4, 24.5))),
    "convnext_iso_small": ("Isotropic ConvNeXt-S", (
        (60.5, 31.7, 20.8, 4.0), (68.0, 38.9, 38.3, 17.0), (64.5, 38.5, 36.5, 17.7),
        (69.0, 44.2, 36.6, 14.9))),
    "convnext_iso_small_cvst": ("Iso-ConvNeXt-S + CvSt", (
        (62.1, 33.5, 40.0, 23.8), (69.5, 41.8, 46.2, 26.9), (69.5, 42.1, 47.2, 28.9),
        (70.2, 45.9, 49.2, 27.9))),
    "vit_small": ("ViT-S", ((61.5, 31.8, 35.5, 15.1), (66.8, 39.1, 34.5, 12.6),
                            (65.2, 39.2, 37.3, 16.2), (69.2, 44.0, 37.5, 15.1))),
    "vit_small_cvst": ("ViT-S + CvSt", ((62.8, 34.4, 39.2, 20.4), (71.2, 44.3, 47.1, 23.2),
                                        (69.9, 44.0, 47.1, 25.9), (72.5, 48.1, 50.4, 26.7))),
}
TABLE1: dict[str, PaperRow] = {}
for _key, (_arch, _rows) in _TABLE1.items():
    for _suffix, _scheme, _values in zip(("random_basic", "pretrained_basic", "pretrained_heavy",
                                          "300ep"), (_RANDOM, _PRETRAINED, _HEAVY, _LONGER),
                                         _rows):
        TABLE1[f"{_key}_{_suffix}"] = _table1(_arch, _scheme, *_values)

# Table 2, the "ours" rows, keyed by their recipe.
TABLE2: dict[str, PaperRow] = {
    "table2_vit_small_300ep_2step": _table2("small", "ViT-S", 300, 2, 69.22, 44.04, 37.52,
                                            15.12),
    "table2_convnext_iso_small_300ep_2step": _table2("small", "Isotropic-CN-S", 300, 2, 69.04,
                                                     44.22, 36.64, 14.88),
    "table2_convnext_iso_small_cvst_300ep_2step": _table2(
        "small", "Isotropic-CN-S + ConvStem", 300, 2, 70.02, 45.90, 49.24, 27.84),
    "table2_vit_small_cvst_300ep_2step": _table2("small", "ViT-S + ConvStem", 300, 2, 72.56,
                                                 48.08, 50.40, 26.68),
    "table2_convnext_tiny_300ep_2step": _table2("small", "ConvNeXt-T", 300, 2, 72.40, 48.60,
                                                38.02, 14.88),
    "table2_convnext_tiny_cvst_300ep_2step": _table2("small", "ConvNeXt-T + ConvStem", 300, 2,
                                                     72.72, 49.46, 48.42, 24.52),
    "table2_convnext_tiny_cvst_300ep_3step": _table2("small", "ConvNeXt-T + ConvStem", 300, 3,
                                                     72.70, 50.16, 49.00, 24.16),
    "table2_vit_medium_50ep_2step": _table2("medium", "ViT-M", 50, 2, 71.72, 47.24, 49.02,
                                            29.20),
    "table2_vit_medium_cvst_50ep_2step": _table2("medium", "ViT-M + ConvStem", 50, 2, 72.40,
                                                 48.80, 50.56, 28.12),
    "table2_convnext_small_50ep_2step": _table2("medium", "ConvNeXt-S", 50, 2, 74.10, 52.32,
                                                43.84, 19.52),
    "table2_convnext_small_cvst_50ep_2step": _table2("medium", "ConvNeXt-S + ConvStem", 50, 2,
                                                     74.10, 52.42, 50.88, 25.64),
    "table2_vit_base_50ep_2step": _table2("large", "ViT-B", 50, 2, 73.32, 50.02, 52.14, 33.12),
    "table2_vit_base_cvst_50ep_2step": _table2("large", "ViT-B + ConvStem", 50, 2, 74.38, 52.58,
                                               54.38, 31.20),
    "table2_convnext_base_50ep_2step": _table2("large", "ConvNeXt-B", 50, 2, 75.62, 54.34,
                                               48.52, 23.70),
    "table2_convnext_base_cvst_50ep_2step": _table2("large", "ConvNeXt-B + ConvStem", 50, 2,
                                                    75.32, 54.38, 50.06, 24.76),
    "table2_vit_base_cvst_250ep_2step": _table2("large", "ViT-B + ConvStem", 250, 2, 76.30,
                                                54.66, 56.30, 32.06),
    "table2_convnext_base_cvst_250ep_2step": _table2("large", "ConvNeXt-B + ConvStem", 250, 2,
                                                     75.90, 56.14, 49.12, 23.34),
    "table2_convnext_base_cvst_250ep_3step": _table2("large", "ConvNeXt-B + ConvStem", 250, 3,
                                                     75.18, 56.28, 49.40, 23.60),
}

# Tables 11 (attack steps; l_inf only) and 12 (PGD instead of APGD).
OTHER: dict[str, PaperRow] = {
    "table11_convnext_tiny_cvst_50ep_1step": PaperRow(
        "Table 11", "ConvNeXt-T + ConvStem, 50 epochs, 1 step", 71.0, 46.4, None, None),
    "table11_convnext_tiny_cvst_50ep_2step": PaperRow(
        "Table 11", "ConvNeXt-T + ConvStem, 50 epochs, 2 steps", None, 47.5, None, None),
    "table12_convnext_tiny_50ep_pgd2": PaperRow("Table 12", "ConvNeXt-T, PGD (2 steps)", 72.8,
                                                45.4, 39.1, 16.5),
}


def paper_rows(recipe: str | None) -> list[PaperRow]:
    """The printed rows ``recipe`` reproduces, Table 2 first; empty for any other recipe."""
    if not recipe:
        return []
    rows = [TABLE2[recipe]] if recipe in TABLE2 else []
    if recipe.startswith("table1_"):
        key = recipe.removeprefix("table1_")
        rows += [TABLE1[key]] if key in TABLE1 else []
    elif recipe.startswith("table2_") and recipe.endswith("_300ep_2step"):
        # The 300-epoch Table 2 rows are Table 1's last row of their architecture.
        key = recipe.removeprefix("table2_").removesuffix("_2step")
        rows += [TABLE1[key]] if key in TABLE1 else []
    if recipe in OTHER:
        rows.append(OTHER[recipe])
    return rows


def size_reference(params_m: float | None) -> PaperRow | None:
    """The paper's most l_inf-robust "ours" row of Table 2 in the size class of a model with
    ``params_m`` million parameters (small < 30, medium 30-80, large >= 80): what a model of no
    paper row compares with."""
    if params_m is None:
        return None
    size = "small" if params_m < 30 else "medium" if params_m < 80 else "large"
    rows = [row for row in TABLE2.values() if row.table == f"Table 2 ({size})"]
    return max(rows, key=lambda row: row.linf or 0.0)


def reference_rows(recipe: str | None, params_m: float | None) -> tuple[list[PaperRow], bool]:
    """The rows to print beside a version, and whether it reproduces them (its recipe is a
    row) or they are only a reference (Table 2's best of its size class)."""
    rows = paper_rows(recipe)
    if rows:
        return rows, True
    reference = size_reference(params_m)
    return ([reference] if reference is not None else []), False


def paper_setting_differences(norm_eps: dict[str, float], n: int, resolution: int,
                              data: str) -> list[str]:
    """Why a result cannot stand beside the paper's numbers (empty when it can): other radii,
    fewer images, another side or data that is not ImageNet's validation set."""
    found = []
    for name, eps in norm_eps.items():
        if name not in PAPER_EPS:  # a norm the paper has no radius for cannot stand beside it
            found.append(f"norm {name!r} (paper: {', '.join(PAPER_EPS)})")
            continue
        norm = cast(Norm, name)
        if abs(eps - PAPER_EPS[norm]) > 1e-6 * PAPER_EPS[norm]:
            found.append(f"{TITLES[norm]} radius {eps:.6g} (paper {PAPER_EPS[norm]:.6g})")
    if n != PAPER_N:
        found.append(f"n={n} (paper {PAPER_N})")
    if resolution != PAPER_RESOLUTION:
        found.append(f"{resolution} px (paper {PAPER_RESOLUTION})")
    if "robustbench" not in data.lower() and "imagenet" not in data.lower():
        found.append(f"data {data} (paper: ImageNet validation)")
    return found
