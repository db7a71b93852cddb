"""The retry budget and backoff in-process (gateway/retry.py).

Envoy's retry budget idea: retries may add at most ``ratio`` of the request rate (every request
deposits ``ratio``, every retry spends one token), plus a trickle of ``min_per_second`` so a quiet
gateway can still retry; the bucket holds at most ``cap``. The clock is a fake one handed to the
module, so no test waits.
"""

from __future__ import annotations

import random
import types

import pytest

from gateway import retry
from gateway.retry import RetryBudget, backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(retry, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def spend(budget: RetryBudget) -> int:
    """Retries the budget allows right now."""
    n = 0
    while budget.withdraw():
        n += 1
        assert n <= 1000, "the budget never runs out"
    return n


def test_starts_full_then_runs_out(clock: Clock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, cap=5)
    assert spend(budget) == 5
    assert budget.withdraw() is False


def test_each_request_adds_ratio_of_a_retry(clock: Clock) -> None:
    budget = RetryBudget(ratio=0.25, min_per_second=0, cap=5)
    spend(budget)
    for _ in range(3):
        budget.deposit()
    assert budget.withdraw() is False  # 0.75 of a retry
    budget.deposit()
    assert spend(budget) == 1  # 4 requests x 0.25: one retry
    for _ in range(40):
        budget.deposit()
    assert spend(budget) == 5  # 40 x 0.25 = 10 tokens, held to the cap of 5


def test_deposits_stop_at_the_cap(clock: Clock) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, cap=3)
    spend(budget)
    for _ in range(100):
        budget.deposit()
    assert spend(budget) == 3


def test_a_quiet_gateway_earns_min_per_second(clock: Clock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=2.0, cap=10)
    spend(budget)
    clock.now += 0.25
    assert budget.withdraw() is False  # half a token
    clock.now += 0.25
    assert spend(budget) == 1  # 0.5 s x 2/s, the half token included
    clock.now += 100
    assert spend(budget) == 10  # the trickle also stops at the cap


def test_backoff_is_full_jitter_under_the_capped_exponential() -> None:
    rng = random.Random(7)
    state = random.getstate()
    random.setstate(rng.getstate())
    try:
        for attempt, bound in ((0, 0.05), (1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10, 0.5)):
            delays = [backoff(attempt, base=0.05, cap=0.5) for _ in range(200)]
            assert all(0 <= d <= bound for d in delays), (attempt, max(delays))
            assert max(delays) > 0.9 * bound  # uniform over the whole range, not a fixed delay
            assert min(delays) < 0.1 * bound
    finally:
        random.setstate(state)
