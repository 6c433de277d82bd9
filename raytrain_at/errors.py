"""User-facing errors.

Every problem a user can fix (a bad path, key, value, stem spec or checkpoint) is raised as
:class:`UserError` with a one-line message that names the culprit. The CLI turns it into that line
on stderr and a non-zero exit, without a traceback; library callers can catch it like any exception.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, reported as one line that names the culprit."""
