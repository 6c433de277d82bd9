"""95 % Wilson score intervals of accuracies: what "100 % on 8 digits" can and cannot say.

An accuracy measured on n images is a binomial proportion; its Wilson interval stays inside
[0, 1] and keeps a sensible width at 0/n and n/n, where the normal ("Wald") interval collapses to
a point. 8/8 correct gives [0.676, 1.000]: the evaluation cannot tell 100 % from 70 %.

Hand-written on purpose: the interval is a closed form of four lines, and its library home
(``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, the reference the tests compare
with) costs about 5 s of import on this kind of machine, paid by every ``register`` and
``leaderboard``.
"""

from __future__ import annotations

import math

# The 97.5 % quantile of the standard normal (two-sided 95 %).
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (95 % for the default ``z``).

    Args:
        successes: correctly classified (or robust) images, ``0 <= successes <= n``.
        n: images evaluated, ``n >= 1``.
        z: the normal quantile of the two-sided confidence level.

    Returns:
        ``(low, high)`` as fractions in [0, 1].

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside ``0..n``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: {successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0/n and n/n the bound is exactly 0 or 1; rounding must not move it off.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """The Wilson interval of an accuracy measured on ``n`` images (``accuracy * n`` images
    right, rounded: stored accuracies are exact fractions of n)."""
    return wilson_interval(round(accuracy * n), n)


def interval_text(interval: tuple[float, float] | list[float] | None, digits: int = 1) -> str:
    """``[67.6, 100.0]`` (percent), or ``""`` when there is none."""
    if interval is None:
        return ""
    low, high = interval
    return f"[{100 * low:.{digits}f}, {100 * high:.{digits}f}]"
