"""User-facing errors.

Every problem a user can fix (a bad path, key, value, stem spec or checkpoint) is raised as
:class:`UserError` with a one-line message that names the culprit. The CLI turns it into that line
on stderr and a non-zero exit, without a traceback; library callers can catch it like any exception.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, reported as one line that names the culprit."""


class RunFailed(RuntimeError):
    """A run that started and then failed (a worker died, the node ran out of memory).

    Not the user's input: the CLI prints its one line, which says where the full output is, and
    exits with 1.
    """


class NonFiniteLoss(RunFailed):
    """The training loss became NaN or infinite: the run stops before the epoch's checkpoint,
    so the last checkpoint written (the one a re-run resumes from) holds finite weights. Not
    retried: the retry would resume from that checkpoint and meet the same loss."""


class RetriesStopped(RunFailed):
    """Ray Train stops retrying a run: its hourly failure budget is spent, or the failure is
    one a retry would repeat (raised in Ray's controller by the failure-budget callback)."""


def first_lines(message: str, limit: int = 300) -> str:
    """The first two non-empty lines of a long framework message, joined and cut to ``limit``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()][:2]
    text = " ".join(lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."
