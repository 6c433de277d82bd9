"""Validation splits carved from training data, for datasets that ship none.

Checkpoints and hyperparameters are chosen on held-out *training* images, never on the test set
(as heldout4k is for ImageNet). For a dataset with only train / test, ``val`` is a seeded,
class-balanced 10% of each class of the official training split, ``train`` is the rest and
``trainval`` the whole official training split. The draw depends only on the labels' order, the
class and :data:`VAL_SEED`, so every machine carves the same images.
"""

from __future__ import annotations

from typing import TypeVar
from collections.abc import Sequence

import numpy as np

from raytrain_at.errors import UserError

VAL_SEED = 0
VAL_FRACTION = 0.1
CARVED_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")

T = TypeVar("T")


def validation_mask(labels: Sequence[int] | np.ndarray, fraction: float = VAL_FRACTION,
                    seed: int = VAL_SEED) -> np.ndarray:
    """Boolean mask over ``labels``: True for the validation images.

    Each class gives ``round(fraction * n)`` of its ``n`` images (at least one when it has two or
    more), picked by a permutation seeded with ``(seed, class)``.
    """
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        order = np.random.default_rng([seed, int(label)]).permutation(len(members))
        mask[members[order[:count]]] = True
    return mask


def carve(items: list[T], labels: Sequence[int], split: str, dataset: str) -> list[T]:
    """The ``train`` / ``val`` / ``trainval`` part of an official training split ``items``."""
    if split == "trainval":
        return list(items)
    if split not in ("train", "val"):
        raise UserError(f"{dataset} split {split!r} is not one of {', '.join(CARVED_SPLITS)}")
    mask = validation_mask(labels)
    keep = mask if split == "val" else ~mask
    return [item for item, chosen in zip(items, keep) if chosen]
