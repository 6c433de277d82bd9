"""Per-sample attack losses on logits: cross-entropy (hard or soft targets), DLR, targeted DLR.

DLR (Croce & Hein 2020) is the margin between the true class and the best other class divided by
the spread of the top logits, which makes it invariant to shift and scale of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices from hard labels (B,) or soft targets (B, C)."""
    return y.argmax(dim=1) if y.dim() == 2 else y


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample CE; ``y`` is (B,) class indices or (B, C) soft targets (MixUp/CutMix)."""
    logits = logits.float()
    if y.dim() == 2:
        return -(y * F.log_softmax(logits, dim=1)).sum(dim=1)
    return F.cross_entropy(logits, y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample untargeted DLR loss (needs at least 3 classes)."""
    logits = logits.float()
    y = hard_labels(y)
    top = logits.sort(dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    true_is_top = logits.argmax(dim=1) == y
    best_other = torch.where(true_is_top, top[:, -2], top[:, -1])
    return -(true - best_other) / (top[:, -1] - top[:, -3] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample targeted DLR loss towards ``target`` (needs at least 4 classes)."""
    logits = logits.float()
    y = hard_labels(y)
    top = logits.sort(dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - tgt) / (top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + 1e-12)
