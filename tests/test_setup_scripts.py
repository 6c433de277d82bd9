"""The set-up scripts a node runs at its first boot wait for dpkg's lock (unattended-upgrades
holds it there for minutes) instead of failing the node."""

from __future__ import annotations

import re
from pathlib import Path

SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_every_apt_get_call_waits_for_the_package_lock() -> None:
    calls = [(path.name, line.strip()) for path in sorted(SCRIPTS.rglob("*.sh"))
             for line in path.read_text().splitlines()
             if re.search(r"\bapt-get\b", line) and not line.lstrip().startswith("#")]
    assert len(calls) >= 8, calls  # setup.sh, the cluster's Python, PostgreSQL, cron, browser
    for name, line in calls:
        assert "-o DPkg::Lock::Timeout=" in line, (name, line)
