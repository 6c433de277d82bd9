"""The fault battery: every case is a test marked ``faults`` whose docstring's first paragraph names
the fault it injects and what must hold afterwards (nothing lost, nothing wrongly registered).

``make fault-battery`` runs them; at the end this file writes the result table (case, outcome,
seconds) to ``$RAYTRAIN_AT_CI_ARTIFACTS/fault-battery.md`` (default ``ci-artifacts/``), the table
the README's reliability section records.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_RESULTS: list[tuple[str, str, float]] = []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every case here belongs to the battery, whichever file it is in.
    for item in items:
        if "fault_battery" in str(item.path):
            item.add_marker(pytest.mark.faults)


def _case(item: pytest.Item) -> str:
    function = getattr(item, "function", None)
    # The docstring's first paragraph (it may wrap over several lines).
    doc = (getattr(function, "__doc__", None) or "").strip().split("\n\n")[0]
    return " ".join(doc.split()) or item.name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _RESULTS.append((_case(item), report.outcome, report.duration))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _RESULTS:
        return
    folder = Path(os.environ.get("RAYTRAIN_AT_CI_ARTIFACTS", "ci-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["| fault injected, and what must hold | result | s |", "|---|---|---|"]
    lines += [f"| {case} | {outcome} | {seconds:.0f} |" for case, outcome, seconds in _RESULTS]
    (folder / "fault-battery.md").write_text("\n".join(lines) + "\n")
