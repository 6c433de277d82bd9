"""Who creates a run: the ``mlflow.user`` tag this tool writes and a ``run:`` reference checks.

Against an authenticated server (the cluster's basic-auth MLflow) the creator is the user the
job authenticates as, ``MLFLOW_TRACKING_USERNAME``; elsewhere it is the login name, what MLflow's
own fluent API writes. The tag is written by the client, so it proves nothing on its own: on the
cluster it is the server's authentication that keeps others from creating runs at all, and the
tag keeps a run made by another account (or by another tool on a shared store) from being taken
for one of ours.
"""

from __future__ import annotations

import getpass
import os

from mlflow.utils.mlflow_tags import MLFLOW_USER

__all__ = ["MLFLOW_USER", "run_creator"]


def run_creator() -> str:
    """The name this process creates MLflow runs under."""
    username = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    if username:
        return username
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"
