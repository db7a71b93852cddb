"""The replica breaker's state machine, blame rules and Retry-After, on an injected clock."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from gateway.breaker import BreakerOpen, ReplicaBreaker
from gateway.errors import Fault


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, fail_max: int = 3, reset: float = 30.0, trials: int = 1) -> ReplicaBreaker:
    return ReplicaBreaker("r1", fail_max, reset, trials, clock=clock)


def _fail(b: ReplicaBreaker, fault: Fault, code: str = "upstream_error") -> None:
    b.leave(b.enter(), fault, True, code)


def test_only_backend_faults_open_it() -> None:
    clock = Clock()
    b = _breaker(clock)
    for fault in (Fault.CLIENT, Fault.DEADLINE, Fault.GATEWAY) * 5:
        _fail(b, fault)
    b.leave(b.enter(), None, True)  # cancelled: the client went away
    assert b.state == "closed"
    for _ in range(3):
        _fail(b, Fault.BACKEND)
    assert b.state == "open"
    assert not b.available()


def test_a_success_clears_the_count() -> None:
    b = _breaker(Clock())
    _fail(b, Fault.BACKEND)
    _fail(b, Fault.BACKEND)
    b.leave(b.enter(), None, False)
    _fail(b, Fault.BACKEND)
    _fail(b, Fault.BACKEND)
    assert b.state == "closed"


def test_retry_after_is_the_time_until_the_trial() -> None:
    clock = Clock()
    b = _breaker(clock, fail_max=1, reset=30.0)
    _fail(b, Fault.BACKEND)
    clock.now += 12.5
    assert b.seconds_until_trial() == pytest.approx(17.5)
    with pytest.raises(BreakerOpen) as info:
        b.enter()
    assert info.value.retry_after == 18
    assert info.value.retryable


def test_half_open_after_the_reset_time_then_a_trial_closes_it() -> None:
    clock = Clock()
    b = _breaker(clock, fail_max=1, reset=30.0, trials=1)
    _fail(b, Fault.BACKEND)
    clock.now += 30.0
    assert b.state == "half-open"  # the next request is let through: say so
    assert b.available()
    trial = b.enter()
    assert trial
    assert not b.available()  # one trial at a time
    b.leave(trial, None, False)
    assert b.state == "closed"


def test_a_failed_trial_reopens_for_a_full_reset_time() -> None:
    clock = Clock()
    b = _breaker(clock, fail_max=1, reset=30.0)
    _fail(b, Fault.BACKEND)
    clock.now += 31.0
    _fail(b, Fault.BACKEND)
    assert b.state == "open"
    assert b.seconds_until_trial() == pytest.approx(30.0)


def test_a_client_fault_during_a_trial_decides_nothing() -> None:
    clock = Clock()
    b = _breaker(clock, fail_max=1, reset=30.0)
    _fail(b, Fault.BACKEND)
    clock.now += 30.0
    _fail(b, Fault.CLIENT)
    assert b.state == "half-open"
    assert b.available()  # the trial slot is free again


def test_probe_lets_requests_through_while_open_and_a_success_closes_it() -> None:
    clock = Clock()
    b = _breaker(clock, fail_max=1, reset=30.0)
    _fail(b, Fault.BACKEND)
    with pytest.raises(BreakerOpen):
        b.enter()
    b.probe()
    _fail(b, Fault.BACKEND)  # still failing: stays open, its reset time unchanged
    assert b.state == "open"
    assert b.seconds_until_trial() == pytest.approx(30.0)
    b.leave(b.enter(), None, False)
    assert b.state == "closed"


def test_panic_routing_of_a_failing_replica_logs_no_transition_per_request() -> None:
    b = _breaker(Clock(), fail_max=1, reset=30.0)
    _fail(b, Fault.BACKEND)
    b.probe()
    with capture_logs() as logs:
        for _ in range(10):
            _fail(b, Fault.BACKEND)
    assert logs == []


def test_reset_by_health_checks_closes_it() -> None:
    b = _breaker(Clock(), fail_max=1)
    _fail(b, Fault.BACKEND)
    b.reset()
    assert b.state == "closed" and b.available()


def test_every_transition_is_logged_with_its_cause() -> None:
    clock = Clock()
    b = _breaker(clock, fail_max=2, reset=5.0)
    with capture_logs() as logs:
        _fail(b, Fault.BACKEND, "first_byte_timeout")
        _fail(b, Fault.BACKEND, "upstream_unavailable")
        clock.now += 5.0
        b.leave(b.enter(), None, False)
    changes = [e for e in logs if e["event"] == "circuit breaker state changed"]
    assert [(e["from"], e["to"]) for e in changes] == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ]
    assert all(e["log_level"] == "warning" and e["backend"] == "r1" for e in changes)
    assert "upstream_unavailable" in changes[0]["cause"]
    assert "reset timeout" in changes[1]["cause"]
    assert changes[2]["cause"] == "trial succeeded"
