"""One circuit breaker per replica (pybreaker), driven from asyncio.

pybreaker has no native asyncio support: ``calling()`` is a context manager
that can wrap an ``await`` (its ``call_async`` is Tornado-only, and ``call()``
on a coroutine function counts nothing). What counts as a failure is decided
by the proxy: 5xx, connection errors and timeouts; never a 4xx, never a
client disconnect. pybreaker's half-open state lets every caller through, so
``available()`` limits trials to ``half_open_trials`` at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pybreaker

from gateway.errors import GatewayError


class BreakerOpen(GatewayError):
    status = 503
    type = "server_error"
    code = "circuit_open"
    reason = "upstream_unavailable"


def _not_a_backend_failure(exc: BaseException) -> bool:
    if isinstance(exc, asyncio.CancelledError):
        return True  # the client went away
    return isinstance(exc, GatewayError) and not exc.backend_fault


class ReplicaBreaker:
    def __init__(self, name: str, fail_max: int, reset_seconds: float, half_open_trials: int) -> None:
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_seconds,
            exclude=[_not_a_backend_failure],
            name=name,
            throw_new_error_on_trip=False,
        )
        self._reset = reset_seconds
        self._max_trials = half_open_trials
        self._trials = 0

    @property
    def state(self) -> str:
        return str(self._cb.current_state)  # "closed" | "open" | "half-open"

    def available(self) -> bool:
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            opened = self._cb._state_storage.opened_at
            if opened is None or time.time() < opened.timestamp() + self._reset:
                return False
        return self._trials < self._max_trials

    def reset(self) -> None:
        """Close the breaker: health checks proved the replica is back."""
        if self._cb.current_state != pybreaker.STATE_CLOSED:
            self._cb.close()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Wrap one upstream exchange; raises BreakerOpen if the breaker refuses it."""
        cb = self._cb
        if cb.current_state == pybreaker.STATE_CLOSED and cb.fail_counter == 0:
            # The common case, a healthy replica: a success would change nothing in pybreaker, so
            # it is not told (its calling() takes a lock and several calls); a failure is handed
            # to it as if raised inside calling(), which counts it and may open the breaker.
            try:
                yield
            except BaseException as exc:
                if not _not_a_backend_failure(exc):
                    self._count(exc)
                raise
            return
        trial = cb.current_state != pybreaker.STATE_CLOSED
        if trial:
            self._trials += 1
        try:
            with cb.calling():
                yield
        except pybreaker.CircuitBreakerError:
            raise BreakerOpen("The backend's circuit breaker is open.", retry_after=1) from None
        finally:
            if trial:
                self._trials -= 1

    def _count(self, exc: BaseException) -> None:
        try:
            with self._cb.calling():
                raise exc
        except BaseException as again:
            if again is not exc and not isinstance(again, pybreaker.CircuitBreakerError):
                raise
