"""The console lines of a training run: a progress bar within an epoch, one line per epoch.

Fixed formats, so a log file reads as a table and a test can parse them.
"""

from __future__ import annotations

from typing import Any

BAR_WIDTH = 20


def _duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#######.............]`` for ``done`` of ``total``."""
    filled = width if total <= 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_line(progress: Any, run_name: str) -> str:
    """One step-progress line (``progress`` is a :class:`~raytrain_at.training.loop.StepProgress`).

    Example: ``train-x epoch 2/6 [#####...............] 12/46 loss 1.234 acc 0.512
    410 img/s lr 1.2e-03 eta 0:14``
    """
    return (f"{run_name} epoch {progress.epoch}/{progress.epochs} "
            f"{progress_bar(progress.step, progress.steps)} {progress.step}/{progress.steps} "
            f"loss {progress.loss:.3f} acc {progress.accuracy:.3f} "
            f"{progress.images_per_s:.0f} img/s lr {progress.lr:.1e} "
            f"eta {_duration(progress.eta_s)}")


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    """The line after each epoch: training and held-out figures, and the epoch's time."""
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}"]
    for key, label in (("train_loss", "loss"), ("train_accuracy", "train acc"),
                       ("heldout_clean_accuracy", "held-out clean"),
                       ("heldout_robust_accuracy", "robust")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.3f}")
    if "epoch_seconds" in metrics:
        parts.append(f"({_duration(metrics['epoch_seconds'])})")
    return " ".join(parts)
