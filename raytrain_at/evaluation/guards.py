"""Evaluation guards: the checks that say whether a robust accuracy can be trusted.

AutoAttack runs its own checks (``pyautoattack.checks``: randomised outputs, probabilities instead
of logits, dynamic defences, zero gradients, too many target classes) and reports them as log
warnings; :func:`capture_autoattack_warnings` records them by kind so they travel with the chunk
state and the result. The rest are checked on the merged numbers: robust <= clean, every
perturbation inside its ball, Square (a gradient-free attack) finding little after the gradient
attacks, and robust accuracy non-increasing in the radius. A result is trustworthy when every
guard passed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from collections.abc import Iterator, Sequence

AUTOATTACK_LOGGER = "auto-attack"
# Kinds of AutoAttack warnings, recognised by a phrase of their message.
WARNING_KINDS: dict[str, str] = {
    "randomized": "randomized defense",
    "logits_range": "probability distribution",
    "dynamic": "dynamic defense",
    "zero_gradients": "zero gradient",
    "target_classes": "target classes",
}
# AutoAttack's threshold for Square improving on the gradient attacks (checks.check_square_sr).
SQUARE_TOLERANCE = 0.002
# Slack for float rounding when checking that perturbations stay inside the ball.
RADIUS_SLACK = 1e-4


@dataclass(frozen=True)
class Guard:
    """One check: its name (``check.threat-key``, usable as an MLflow tag key), whether it
    passed, and what it saw."""

    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.kinds: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for kind, phrase in WARNING_KINDS.items():
            if phrase in message:
                self.kinds.setdefault(kind, message)


@contextmanager
def capture_autoattack_warnings() -> Iterator[dict[str, str]]:
    """Collect AutoAttack's check warnings (kind -> first message) while the block runs, and
    keep them off the console: they are reported once, as guards."""
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    collector = _Collector()
    old_propagate = logger.propagate
    logger.addHandler(collector)
    logger.propagate = False
    try:
        yield collector.kinds
    finally:
        logger.removeHandler(collector)
        logger.propagate = old_propagate


def autoattack_guards(seen: dict[str, str]) -> list[Guard]:
    """One guard per AutoAttack check kind, failed when that warning appeared."""
    return [Guard(kind, kind not in seen, seen.get(kind, "no warning"))
            for kind in WARNING_KINDS]


def robust_not_above_clean(label: str, clean: float, robust: float) -> Guard:
    return Guard(f"robust_le_clean.{label}", robust <= clean + 1e-12,
                 f"clean {clean:.4f}, robust {robust:.4f}")


def perturbation_inside_ball(label: str, eps: float, largest: float) -> Guard:
    return Guard(f"inside_ball.{label}", largest <= eps * (1 + RADIUS_SLACK) + 1e-7,
                 f"largest perturbation {largest:.6g}, radius {eps:.6g}")


def square_found_little(label: str, broken_by_square: int, n: int) -> Guard:
    share = broken_by_square / n if n else 0.0
    return Guard(f"square_after_gradient.{label}", share <= SQUARE_TOLERANCE,
                 f"Square broke {broken_by_square} of {n} points the gradient attacks left")


def non_increasing(label: str, radii: Sequence[float], accuracies: Sequence[float]) -> Guard:
    """Robust accuracy must not grow with the radius (a larger ball contains the smaller)."""
    points = list(zip(radii, accuracies))
    rises = [(a, b) for a, b in zip(points, points[1:]) if b[1] > a[1]]
    detail = "monotone" if not rises else "; ".join(
        f"{a[1]:.4f} at {a[0]:.5g} < {b[1]:.4f} at {b[0]:.5g}" for a, b in rises)
    return Guard(f"non_increasing_in_eps.{label}", not rises, detail)
