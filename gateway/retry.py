"""Retries before the first byte: a budget so retries cannot multiply an outage, and jittered backoff."""

from __future__ import annotations

import random
import time


class RetryBudget:
    """Retries may add at most ``ratio`` of the request rate, plus a small floor.

    A token bucket: every request deposits ``ratio`` tokens, every retry spends
    one; ``min_per_second`` tokens trickle in so a quiet gateway can still retry.
    """

    def __init__(self, ratio: float, min_per_second: float = 1.0, cap: float = 20.0) -> None:
        self._ratio = ratio
        self._min = min_per_second
        self._cap = cap
        self._tokens = cap
        self._stamp = time.monotonic()

    def deposit(self) -> None:
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def withdraw(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._cap, self._tokens + (now - self._stamp) * self._min)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def backoff(attempt: int, base: float, cap: float = 1.0) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))
