"""Where the project keeps its own files by default: ``$RAYTRAIN_AT_HOME`` or ``~/.raytrain_at``
(bundled datasets written to FFCV, Ray Train run folders, evaluation state)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """The project's storage root (not created here)."""
    return Path(os.environ.get("RAYTRAIN_AT_HOME", Path.home() / ".raytrain_at"))
