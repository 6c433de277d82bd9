"""A failure budget per hour for Ray Train runs, instead of Ray's count over the whole run.

A run of several days on spot GPUs meets reclaims and node losses at a steady rate, so a limit
on the whole run's failures ends it sooner or later; what signals a broken run is many failures
close together. Ray Train V2 counts ``FailureConfig.max_failures`` over the run, so the trainer
gets ``max_failures=-1`` (Ray retries without limit) and :class:`FailureBudgetCallback`, a
controller callback, decides instead: before the controller executes a RETRY it counts the
failures of the last hour (:class:`HourlyFailures`) and, past ``scaling.max_failures_per_hour``,
raises :class:`RetriesStopped`, which Ray turns into a non-retryable controller error, so the run
stops with that one line.

A failure that a retry would only repeat (a non-finite loss, a :class:`UserError` such as a
resume with no good checkpoint) stops the run at once, whatever the budget: the worker's own
line is the message.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from raytrain_at.errors import NonFiniteLoss, RetriesStopped, UserError, first_lines

HOUR_S = 3600.0

# Failures that the next attempt would repeat: it resumes from the same checkpoint, with the
# same config and data.
NOT_RETRYABLE: tuple[type[BaseException], ...] = (NonFiniteLoss, UserError)


class HourlyFailures:
    """Failure times in a sliding hour, against a budget (None: no limit).

    Args:
        budget: failures allowed within any hour.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, budget: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self._times: deque[float] = deque()

    def record(self) -> bool:
        """Count one failure now; True while the last hour's failures stay within the budget."""
        now = self._clock()
        self._times.append(now)
        while self._times and self._times[0] <= now - HOUR_S:
            self._times.popleft()
        return self.budget is None or len(self._times) <= self.budget

    @property
    def in_last_hour(self) -> int:
        now = self._clock()
        return sum(1 for t in self._times if t > now - HOUR_S)


class FailureBudgetCallback(ControllerCallback, WorkerGroupCallback):
    """Ray Train controller callback enforcing ``scaling.max_failures_per_hour``.

    It sees the workers' errors when the controller polls them (``after_worker_group_poll_
    status``) and each failure decision before the controller executes it; it runs inside
    Ray's controller actor (it travels there pickled, with its counter).
    """

    def __init__(self, budget: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = HourlyFailures(budget, clock)
        self._errors: dict[int, BaseException] = {}

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        errors = worker_group_status.errors
        if errors:
            self._errors = dict(errors)

    def before_controller_execute_failure_decision(self, failure_decision) -> None:
        if failure_decision != FailureDecision.RETRY:
            return
        errors, self._errors = self._errors, {}
        check_retry(self.failures, errors)


def check_retry(failures: HourlyFailures, errors: dict[int, BaseException]) -> None:
    """Raise :class:`RetriesStopped` unless the failure with these worker errors (rank ->
    exception; empty for a controller-side failure) may be retried.

    Raises:
        RetriesStopped: a worker's error cannot be retried (its own message), or this failure
            exceeds the hourly budget (one line naming ``scaling.max_failures_per_hour``).
    """
    for rank, error in sorted(errors.items()):
        if isinstance(error, NOT_RETRYABLE):
            raise RetriesStopped(f"{first_lines(str(error))} (rank {rank}; not retried)")
    if not failures.record():
        last = next(iter(sorted(errors.items())), None)
        cause = f"; the last: rank {last[0]}: {first_lines(str(last[1]), 160)}" if last else ""
        raise RetriesStopped(
            f"{failures.in_last_hour} failures within an hour exceed "
            f"scaling.max_failures_per_hour={failures.budget}: not retried{cause}")
