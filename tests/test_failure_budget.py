"""The hourly failure budget (training.failure_budget) and how Ray Train's controller takes its
decision: counted in a sliding hour, unlimited when None, and no retry of a failure that the
next attempt would repeat."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from ray.train import ControllerError, FailureConfig, WorkerGroupError
from ray.train.v2._internal.execution.failure_handling import (DefaultFailurePolicy,
                                                               FailureDecision)

from raytrain_at.errors import NonFiniteLoss, RetriesStopped, UserError
from raytrain_at.training.failure_budget import (FailureBudgetCallback, HourlyFailures,
                                                 check_retry)
from raytrain_at.training.launch import failure_line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_count_in_a_sliding_hour() -> None:
    clock = Clock()
    failures = HourlyFailures(2, clock)
    assert failures.record() and failures.record()  # two at t=0
    clock.now += 1800
    assert not failures.record()  # a third within the hour
    clock.now += 1800.5  # the first two are now more than an hour old
    assert failures.in_last_hour == 1
    assert failures.record()  # two in the last hour again


def test_no_budget_means_unlimited() -> None:
    failures = HourlyFailures(None, Clock())
    assert all(failures.record() for _ in range(500))


def test_a_spent_budget_stops_with_one_line_naming_it() -> None:
    failures = HourlyFailures(1, Clock())
    check_retry(failures, {1: RuntimeError("worker died")})
    with pytest.raises(RetriesStopped) as caught:
        check_retry(failures, {0: RuntimeError("node lost\nmore")})
    message = str(caught.value)
    assert message == ("2 failures within an hour exceed scaling.max_failures_per_hour=1: not "
                       "retried; the last: rank 0: node lost more")


@pytest.mark.parametrize("error", [NonFiniteLoss("the training loss is nan in epoch 2"),
                                   UserError("no checkpoint of this run passes its checksums")])
def test_a_failure_a_retry_would_repeat_stops_at_once(error) -> None:
    failures = HourlyFailures(None, Clock())
    with pytest.raises(RetriesStopped, match=rf"^{error} \(rank 1; not retried\)$"):
        check_retry(failures, {0: RuntimeError("collateral"), 1: error})
    assert failures.in_last_hour == 0  # not charged


def test_the_callback_checks_retries_only() -> None:
    callback = pickle.loads(pickle.dumps(FailureBudgetCallback(0)))  # it travels to Ray
    callback.before_controller_execute_failure_decision(FailureDecision.RAISE)  # nothing
    callback.after_worker_group_poll_status(SimpleNamespace(errors={}))
    callback.after_worker_group_poll_status(SimpleNamespace(errors={1: OSError("gone")}))
    with pytest.raises(RetriesStopped, match="scaling.max_failures_per_hour=0.*rank 1: gone"):
        callback.before_controller_execute_failure_decision(FailureDecision.RETRY)


def test_ray_raises_the_callbacks_stop_and_the_driver_prints_its_line() -> None:
    """What Ray's controller does with the callback's exception (it wraps it in a
    ControllerError, callback_manager.py): its default policy does not retry it, while it
    retries worker failures without limit (max_failures=-1)."""
    policy = DefaultFailurePolicy(FailureConfig(max_failures=-1))
    workers = WorkerGroupError("boom", {0: RuntimeError("boom")})
    assert all(policy.make_decision(workers) == FailureDecision.RETRY for _ in range(50))
    stop = ControllerError(RetriesStopped("3 failures within an hour exceed ..."))
    assert policy.make_decision(stop) == FailureDecision.RAISE
    assert failure_line(stop) == "3 failures within an hour exceed ..."
    assert failure_line(workers) == "Training failed due to worker errors: boom"
