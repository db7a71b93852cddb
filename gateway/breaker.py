"""One circuit breaker per replica: pybreaker's counter and states, driven from asyncio.

pybreaker has no native asyncio support (its ``call_async`` is Tornado-only), so an
exchange is bracketed by :meth:`ReplicaBreaker.enter` and :meth:`ReplicaBreaker.leave`,
and the outcome is handed to pybreaker only when it changes something.

What counts is decided from the failure's typed blame (``gateway.errors.Fault``): only
``Fault.BACKEND`` failures (5xx, connection errors, backend silence) count, like Envoy's
outlier detection counts upstream errors only; a slow or vanished client, a 4xx, the
request's own total deadline and the gateway's own trouble never do. A finished exchange
with no failure is a success (a 4xx proves the replica answers); anything else tells the
breaker nothing. pybreaker's half-open state lets every caller through, so ``available()``
limits trials to ``half_open_trials`` at once. Every state change is logged at WARNING
with its cause.

Capacity coming back is announced through ``on_available`` (the admission queue's dispatch):
when the breaker closes or goes half-open, and at the reset time of an open one, from a timer
armed when it opened, because pybreaker only moves to half-open lazily, on the next call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pybreaker
import structlog

from gateway.errors import Fault, GatewayError

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class BreakerOpen(GatewayError):
    status = 503
    type = "server_error"
    code = "circuit_open"
    reason = "upstream_unavailable"
    retryable = True  # refused before anything was sent: another replica may serve it


class _BackendFailure(Exception):
    """What pybreaker is shown for a failure it counts (it only learns outcomes from exceptions)."""


def _not_counted(exc: BaseException) -> bool:
    return not isinstance(exc, _BackendFailure)


class _TransitionLog(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: ReplicaBreaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        owner = self._owner
        owner.panic = False
        if new_state.name == OPEN:
            owner.opened_at = owner.clock()
            owner._wake_after(owner._reset)
        else:
            # pybreaker tells listeners before its state storage changes: announce it once the
            # state is readable, not from inside the transition.
            owner._wake_after(0.0)
        owner.log.warning(
            "circuit breaker state changed",
            backend=cb.name,
            **{"from": old_state.name if old_state is not None else None, "to": new_state.name},
            cause=owner.cause,
        )


def _nothing() -> None:
    pass


class ReplicaBreaker:
    """``fail_max`` consecutive backend failures open it for ``reset_seconds``; then trials.

    ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        name: str,
        fail_max: int,
        reset_seconds: float,
        half_open_trials: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.cause = "start"  # why the next state change happens, for its log line
        self.opened_at = 0.0  # clock() when it last opened
        self.panic = False  # panic routing lets requests through while open (until a state change)
        self.log = structlog.get_logger("gateway.breaker")
        self._reset = reset_seconds
        self._max_trials = half_open_trials
        self._trials = 0
        # Called (on the event loop) when it may let requests in again; set by the app's wiring.
        self.on_available: Callable[[], None] = _nothing
        self._timer: asyncio.TimerHandle | None = None
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_seconds,
            exclude=[_not_counted],
            listeners=[_TransitionLog(self)],
            name=name,
            throw_new_error_on_trip=False,
        )

    @property
    def state(self) -> str:
        """The state: closed, open or half-open.

        An open breaker whose reset time has passed lets the next request through as a trial,
        so it already reports half-open.
        """
        state = str(self._cb.current_state)
        if state == OPEN and self.seconds_until_trial() <= 0:
            return HALF_OPEN
        return state

    def seconds_until_trial(self) -> float:
        """Seconds until the breaker lets a request through again (0 unless open)."""
        if self._cb.current_state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self._reset - self.clock())

    def available(self) -> bool:
        """Whether the router may pick this replica now (closed, or a trial slot is free)."""
        state = self._cb.current_state
        if state == CLOSED:
            return True
        if state == OPEN and self.seconds_until_trial() > 0:
            return False
        return self._trials < self._max_trials

    def allowance(self) -> int | None:
        """Requests it lets through now besides those running: None (no limit) while closed, 0
        while open before the reset time or with every trial slot taken, else the trial slots left.
        ``available()`` is ``allowance() != 0``."""
        state = self._cb.current_state
        if state == CLOSED:
            return None
        if state == OPEN and self.seconds_until_trial() > 0:
            return 0
        left = self._max_trials - self._trials
        return left if left > 0 else 0

    def _wake_after(self, delay: float) -> None:
        """Call ``on_available`` after ``delay`` seconds (outside an event loop: never)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        wait = self.seconds_until_trial()
        if wait > 0:
            # The loop may run a timer up to its clock resolution early: not yet, look again.
            self._wake_after(wait)
            return
        self.on_available()

    def reset(self, cause: str = "health checks passed") -> None:
        """Close the breaker: health checks proved the replica is back."""
        if self._cb.current_state != CLOSED:
            self.cause = cause
            self._cb.close()

    def probe(self) -> None:
        """Panic routing (every replica of the pool is ejected): let requests through while open,
        rather than keep the whole pool dark until the reset time (Envoy's panic threshold).

        The breaker stays open (no state change per request, so a still-failing replica is not a
        flood of transitions); the first request that succeeds closes it.
        """
        if self._cb.current_state == OPEN:
            self.panic = True

    def enter(self) -> bool:
        """Before one exchange; returns whether it is a trial (pass it to leave()).

        Raises BreakerOpen (Retry-After: the seconds until a trial) while open.
        """
        cb = self._cb
        state = cb.current_state
        if state == CLOSED:
            return False
        if state == OPEN:
            wait = self.seconds_until_trial()
            if wait > 0 and self.panic:
                self._trials += 1
                return True
            if wait > 0:
                raise BreakerOpen(
                    "The backend's circuit breaker is open.", retry_after=max(1, math.ceil(wait))
                )
            self.cause = f"reset timeout ({self._reset:g}s) elapsed"
            cb.half_open()
        self._trials += 1
        return True

    def leave(self, trial: bool, fault: Fault | None, failed: bool, code: str = "") -> None:
        """After one exchange: ``failed`` with ``fault`` (``code`` for the log), or not ``failed``.

        Only a Fault.BACKEND failure counts (an open breaker counts nothing more); a success closes
        a half-open breaker (or an open one it let through) and clears the count of a closed
        one; any other ending (client gone, deadline) changes nothing.
        """
        if trial:
            self._trials -= 1
        cb = self._cb
        open_ = cb.current_state == OPEN
        if not failed:
            if open_ and trial:  # let through while open: panic routing, or a trial racing another
                self.cause = "a request succeeded while open (panic routing)"
                cb.close()
            elif trial or (cb.fail_counter and not open_):
                self.cause = "trial succeeded"
                self._report(None)
            return
        if fault is Fault.BACKEND and not open_:
            self.cause = f"{cb.fail_counter + 1} consecutive failure(s), last: {code or 'unknown'}"
            self._report(_BackendFailure(code))

    def _report(self, failure: _BackendFailure | None) -> None:
        try:
            with self._cb.calling():
                if failure is not None:
                    raise failure
        except (_BackendFailure, pybreaker.CircuitBreakerError):
            pass  # counted (or refused while open, which counts nothing)
