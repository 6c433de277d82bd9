"""One row of the preflight table, and the rule that turns blockers into one line."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from raytrain_at.errors import UserError


@dataclass(frozen=True)
class Check:
    """A check's outcome: ``blocker`` is the line that says what to change (None: passed)."""

    name: str
    result: str
    figure: str = ""
    blocker: str | None = None

    @property
    def passed(self) -> bool:
        return self.blocker is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def passed(name: str, result: str, figure: str = "") -> Check:
    return Check(name, result, figure)


def blocked(name: str, line: str) -> Check:
    return Check(name, "BLOCKER", blocker=line)


class PreflightBlocked(UserError):
    """A check found a blocker: the CLI prints its line and exits with 1 (a bad recipe or
    option, found before any check, stays a usage error: exit 2)."""


def raise_first_blocker(checks: list[Check]) -> None:
    """Raise the first blocker's line as :class:`PreflightBlocked` (exit 1, no traceback)."""
    for check in checks:
        if check.blocker is not None:
            raise PreflightBlocked(f"preflight {check.name}: {check.blocker}")
