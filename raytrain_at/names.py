"""The one rule for names that become folders, object-store keys and MLflow lookups.

A run name is Ray Train's run folder under the storage root (local or ``s3://``) and the MLflow
run that ``run:EXPERIMENT/NAME`` resolves; a study name is Tune's folder and a parent run; a
registered-model name is an MLflow registry key. A name such as ``..`` or ``a/b`` would climb out
of, or reach into, another folder, and a trailing newline (which ``re.match`` with ``$`` lets
through) would make two names look alike, so every such name is checked here before anything is
written.
"""

from __future__ import annotations

import re

from raytrain_at.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_LENGTH = 128


def check_name(name: str, what: str) -> str:
    """``name`` if it is a safe name, else a :class:`UserError` of one line naming it.

    A safe name has at most 128 letters, digits, ``.``, ``_`` or ``-``, starts with a letter or
    digit (so neither ``.`` nor ``..`` nor a hidden name) and holds no ``..``; path separators
    and whitespace are refused.

    Args:
        name: the name to check.
        what: what it names, for the message (``run name``, ``study name``, ``model name``).
    """
    if _NAME.fullmatch(name) and ".." not in name and len(name) <= MAX_LENGTH:
        return name
    raise UserError(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most "
                    f"{MAX_LENGTH}), starting with a letter or digit, without '..' or '/'")
