"""Sweeps: robust accuracy against the radius (with expected robustness) and against the test-time
resolution (App. D.5), and their plots."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import numpy as np


def expected_robustness(clean_accuracy: float, radii: Sequence[float],
                        accuracies: Sequence[float]) -> float:
    """Mean robust accuracy for a radius uniform on [0, max radius]: the area under the
    accuracy-vs-radius curve (trapezoids, starting from the clean accuracy at radius 0) divided
    by the largest radius."""
    eps = np.concatenate([[0.0], np.asarray(radii, dtype=float)])
    acc = np.concatenate([[clean_accuracy], np.asarray(accuracies, dtype=float)])
    area = float(np.sum((eps[1:] - eps[:-1]) * (acc[1:] + acc[:-1]) / 2))
    return area / float(eps[-1])


def plot_eps_sweep(path: Path, norm: str, clean_accuracy: float, radii: Sequence[float],
                   accuracies: Sequence[float], title: str) -> Path:
    """Robust accuracy vs radius (l_inf radii in units of 1/255), with the clean point at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 255.0 if norm == "linf" else 1.0
    xs = [0.0] + [r * scale for r in radii]
    ys = [clean_accuracy] + list(accuracies)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [100 * y for y in ys], marker="o")
    ax.fill_between(xs, [100 * y for y in ys], alpha=0.15)
    ax.set_xlabel(f"{norm} radius" + (" (x 1/255)" if norm == "linf" else ""))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_resolution_sweep(path: Path, resolutions: Sequence[int], clean: Sequence[float],
                          robust: dict[str, Sequence[float]], trained: int, title: str) -> Path:
    """Clean and robust accuracy vs test-time resolution (Fig. 3 / 7 of the paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(resolutions, [100 * c for c in clean], marker="o")
    axes[0].set_title("clean")
    for norm, values in robust.items():
        axes[1].plot(resolutions, [100 * v for v in values], marker="o", label=norm)
    axes[1].set_title("robust")
    axes[1].legend()
    for ax in axes:
        ax.axvline(trained, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("test resolution")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
