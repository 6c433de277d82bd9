"""Threat models of the evaluation: norm names, radii in pixel units, and their parsing.

Radii are in [0, 1] pixel scale: an l_inf radius of 4/255 moves each pixel by at most 4 grey
levels; l_2 and l_1 radii are norms of the whole (3, H, W) perturbation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from raytrain_at.config_loader import fraction_value
from raytrain_at.errors import UserError

# The one definition of the threat models' names: the run config's training norm, the attacks,
# the evaluation, the Tune studies, the benchmark and the registry all take them from here.
Norm = Literal["linf", "l2", "l1"]
NORMS: tuple[Norm, ...] = get_args(Norm)
# Project names -> pyautoattack's (and RobustBench's) names.
AUTOATTACK_NORMS: dict[str, Literal["Linf", "L2", "L1"]] = {"linf": "Linf", "l2": "L2", "l1": "L1"}
# The paper's radii at 224x224 (Sec. 3.1), the one copy of them.
PAPER_EPS: dict[Norm, float] = {"linf": 4 / 255, "l2": 2.0, "l1": 75.0}
# Table 5's l_inf radii for the eps sweep.
PAPER_SWEEP_EPS: tuple[float, ...] = (2 / 255, 4 / 255, 6 / 255, 8 / 255)
# Test-time sides of the resolution study (Sec. 6, Fig. 3: 192 to 384).
PAPER_RESOLUTIONS: tuple[int, ...] = (192, 224, 256, 288, 320, 352, 384)


@dataclass(frozen=True)
class ThreatModel:
    """An l_p ball: ``norm`` in ``linf|l2|l1``, ``eps`` its radius in [0, 1] pixel units."""

    norm: str
    eps: float

    @property
    def key(self) -> str:
        """A stable file-name-safe identifier, e.g. ``linf-0.0156863``."""
        return f"{self.norm}-{self.eps:.7g}"

    def label(self) -> str:
        """Human form, l_inf radii as multiples of 1/255 (``linf 4/255``)."""
        if self.norm == "linf":
            return f"linf {self.eps * 255:g}/255"
        return f"{self.norm} {self.eps:g}"


def parse_norms(text: str) -> list[str]:
    """``"linf,l2"`` -> ``["linf", "l2"]`` (order kept, duplicates dropped)."""
    norms: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part not in AUTOATTACK_NORMS:
            raise UserError(f"unknown norm {part!r} in --norms (known: {', '.join(NORMS)})")
        if part not in norms:
            norms.append(part)
    if not norms:
        raise UserError("--norms names no norm")
    return norms


def parse_eps(text: str | float, what: str) -> float:
    """A positive finite radius from ``"4/255"``, ``"0.5"`` or a number; ``what`` names it."""
    try:
        value = fraction_value(text) if isinstance(text, str) else float(text)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number or fraction like 4/255") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{what} {text!r} must be a positive radius")
    return value


def parse_eps_list(text: str, what: str) -> list[float]:
    """Comma-separated radii, strictly increasing (``"2/255,4/255,8/255"``)."""
    values = [parse_eps(part, what) for part in text.split(",") if part.strip()]
    if not values:
        raise UserError(f"{what} names no radius")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"{what} {text!r} must be strictly increasing")
    return values


def scaled_eps(threat: ThreatModel, resolution: int, trained_resolution: int) -> ThreatModel:
    """The radius at another input side with a constant per-pixel budget (App. D.5): l_inf is
    per pixel already; l_2 grows with the side (sqrt of the dimension); l_1 with the area."""
    ratio = resolution / trained_resolution
    power = {"linf": 0, "l2": 1, "l1": 2}[threat.norm]
    return ThreatModel(threat.norm, threat.eps * ratio ** power)

THREAT_TITLES: dict[str, str] = {"linf": "l_inf robust accuracy", "l2": "l_2 robust accuracy",
                                 "l1": "l_1 robust accuracy"}
