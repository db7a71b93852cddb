"""Replica choice with breakers (panic routing), pool capacity and Retry-After, in-process."""

from __future__ import annotations

import pytest

from gateway.backends import Backend, BackendPool, BackendState
from gateway.config import AdmissionSettings, BackendSettings, ResilienceSettings
from gateway.errors import Fault, NoBackendAvailable
from gateway.pipeline.admit import Admission
from gateway.pipeline.route import choose_backend


def _pool(n: int, fail_max: int = 1, max_in_flight: int = 4) -> BackendPool:
    settings = [BackendSettings(url=f"http://10.0.0.{i}:8000", max_in_flight=max_in_flight) for i in range(n)]
    pool = BackendPool(settings, ResilienceSettings(breaker_fail_max=fail_max), recheck_seconds=2.0)
    for b in pool.backends:
        b.state, b.models = BackendState.HEALTHY, {"tiny": {"id": "tiny"}}
    return pool


def _eject(b: Backend) -> None:
    assert b.breaker is not None
    b.breaker.leave(b.breaker.enter(), Fault.BACKEND, True, "upstream_error")
    assert b.breaker.state == "open"


def test_an_ejected_replica_is_skipped() -> None:
    pool = _pool(2)
    _eject(pool.backends[0])
    for _ in range(4):
        assert choose_backend(pool, "tiny") is pool.backends[1]


def test_every_replica_ejected_routes_anyway_as_a_trial() -> None:
    pool = _pool(2)
    for b in pool.backends:
        _eject(b)
    chosen = choose_backend(pool, "tiny")
    assert chosen.breaker is not None
    assert chosen.breaker.enter()  # let through at once, not dark for the reset time


def test_panic_is_about_the_pool_not_the_replicas_this_request_tried() -> None:
    pool = _pool(2)
    a, b = pool.backends
    _eject(b)
    # a was tried and failed (its breaker still closed), b is ejected: no panic, no replica.
    with pytest.raises(NoBackendAvailable):
        choose_backend(pool, "tiny", exclude=(a,))
    assert b.breaker is not None and b.breaker.state == "open"


def test_capacity_counts_ejected_replicas_only_when_all_are() -> None:
    pool = _pool(2, max_in_flight=4)
    admission = Admission(pool, AdmissionSettings(), {})
    assert admission.capacity("tiny") == 8
    _eject(pool.backends[0])
    assert admission.capacity("tiny") == 4
    _eject(pool.backends[1])
    assert admission.capacity("tiny") == 8  # panic routing: the pool is not dark


def test_retry_after_is_the_next_health_recheck_for_a_loading_pool() -> None:
    pool = _pool(1)
    pool.backends[0].state = BackendState.LOADING
    with pytest.raises(NoBackendAvailable) as info:
        choose_backend(pool, "tiny")
    assert info.value.retry_after == 2


def test_retry_after_counts_the_good_checks_a_down_replica_still_needs() -> None:
    pool = _pool(1)  # readmit_after = 2, recheck every 2 s
    b = pool.backends[0]
    b.state, b.good_checks = BackendState.DOWN, 0
    assert pool.retry_after("tiny") == 4
    b.good_checks = 1
    assert pool.retry_after("tiny") == 2


def test_retry_after_of_a_ready_but_busy_pool_is_one_second() -> None:
    pool = _pool(1, max_in_flight=1)
    pool.backends[0].outstanding = 1
    with pytest.raises(NoBackendAvailable) as info:
        choose_backend(pool, "tiny")
    assert info.value.retry_after == 1
